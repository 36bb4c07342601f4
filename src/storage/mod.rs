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
//!   `bucketId` and `projectId`, so where it goes is not known yet). Then the row is reserved
//!   (`size IS NULL`, `upload_token`), the staged object renamed into place, and `size` set;
//!   only rows with a size are listed or signed. Any failure removes the staged object and the
//!   reservation (or, for an `upsert` of an existing file, restores the old row: the old object
//!   is replaced atomically or not at all). Success is answered only after all of it.
//! * **delete**: the row is marked (`deleting_at`, hidden from then on), the object deleted,
//!   then the row. If the object cannot be deleted the mark is lifted (both stay); if the row
//!   cannot be removed afterwards it stays hidden and the start-up sweep finishes it.
//! * the sweep at start-up also drops reservations and staged objects older than an hour
//!   (uploads cut off by a crash).

pub mod backend;
pub mod names;
pub mod signing;
mod upload;

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{json, Value};
use warp::http::{HeaderMap, StatusCode};
use warp::reply::{Reply, Response};

use crate::api::error::{ApiError, ApiResult};
use crate::app::App;
use crate::auth::{Access, DbRole};
use crate::config::Config;
use crate::secrets::Secrets;

pub use backend::Backend;
pub use signing::Clock;

/// How long a download URL is valid: the guide's 15 minutes.
pub const URL_TTL: Duration = Duration::from_secs(15 * 60);
/// Where uploads are staged before their destination is known.
const STAGING: &str = ".uploads";
/// Reservations and staged objects older than this are abandoned uploads.
const ABANDONED_AFTER_SECS: i64 = 3600;

/// The storage state of a running server.
pub struct Storage {
    pub backend: Backend,
    /// Time as seen by URL signing and expiry; tests move it forward.
    pub clock: Clock,
    signer: signing::UrlSigner,
    max_upload_bytes: u64,
    /// The last [`Storage::ready`] check and when it ran (checks are at most every few
    /// seconds, however often `/ready` is asked).
    checked: tokio::sync::Mutex<Option<(std::time::Instant, Result<(), String>)>>,
}

impl Storage {
    pub fn open(config: &Config, secrets: &Secrets) -> anyhow::Result<Storage> {
        Ok(Storage {
            backend: Backend::open(config)?,
            clock: Clock::default(),
            signer: signing::UrlSigner::new(&secrets.derive("storage-url-signing")),
            max_upload_bytes: config.max_upload_bytes,
            checked: Default::default(),
        })
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

/// How long a storage readiness check is reused.
pub const READY_CHECK_EVERY: Duration = Duration::from_secs(2);

/// A bucket row.
#[derive(Clone, Debug)]
pub struct Bucket {
    pub id: String,
    pub name: String,
    pub is_public: bool,
    pub max_file_size: Option<i64>,
    pub allowed_mime_types: Option<Vec<String>>,
    pub created_at: DateTime<Utc>,
}

const BUCKET_COLUMNS: &str =
    "id::text, name, is_public, max_file_size, allowed_mime_types, created_at";

impl Bucket {
    fn from_row(r: &tokio_postgres::Row) -> Bucket {
        Bucket {
            id: r.get(0),
            name: r.get(1),
            is_public: r.get(2),
            max_file_size: r.get(3),
            allowed_mime_types: r.get(4),
            created_at: r.get(5),
        }
    }

    fn json(&self) -> Value {
        json!({
            "id": self.id,
            "name": self.name,
            "isPublic": self.is_public,
            "maxFileSize": self.max_file_size,
            "allowedMimeTypes": self.allowed_mime_types,
            "createdAt": self.created_at,
        })
    }
}

const FILE_COLUMNS: &str = "f.id::text, f.name, f.s3_key, f.size, f.content_type, \
     f.bucket_id::text, f.created_at, f.updated_at, b.is_public";

/// A file as the API shows it (the guide's snake_case `s3_key`, and the same style around it).
fn file_json(r: &tokio_postgres::Row, base: &str) -> Value {
    let key: String = r.get(2);
    let public: bool = r.get(8);
    json!({
        "id": r.get::<_, String>(0),
        "name": r.get::<_, String>(1),
        "s3_key": key,
        "size": r.get::<_, Option<i64>>(3),
        "content_type": r.get::<_, String>(4),
        "bucket_id": r.get::<_, String>(5),
        "created_at": r.get::<_, DateTime<Utc>>(6),
        "updated_at": r.get::<_, DateTime<Utc>>(7),
        "public_url": public.then(|| public_url(base, &key)),
    })
}

/// `<base>/api/storage/public/<key>`, each segment percent-encoded: stable for the object's
/// lifetime (the key holds the bucket's UUID, which a rename does not change).
pub fn public_url(base: &str, key: &str) -> String {
    let path: Vec<String> = key
        .split('/')
        .map(|s| percent_encoding::utf8_percent_encode(s, names::PATH_SEGMENT).to_string())
        .collect();
    format!(
        "{}/api/storage/public/{}",
        base.trim_end_matches('/'),
        path.join("/")
    )
}

/// The base URL for links: `FLUXBASE_PUBLIC_URL`, else the `Host` the caller used.
pub fn base_url(config: &Config, headers: &HeaderMap) -> String {
    if let Some(url) = &config.public_url {
        return url.trim_end_matches('/').to_string();
    }
    match headers
        .get(warp::http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            !h.is_empty()
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        }) {
        Some(host) => format!("http://{host}"),
        None => config.base_url(),
    }
}

/// Uploads need a readwrite or admin key, or a developer or admin member.
pub fn require_readwrite(access: &Access, what: &str) -> ApiResult<()> {
    if access.db_role != DbRole::Read {
        return Ok(());
    }
    Err(match access.member_role {
        Some(_) => {
            ApiError::InsufficientPermissions(format!("{what} needs a developer or admin role."))
        }
        None => ApiError::ScopeMismatch(format!("{what} needs a readwrite or admin key.")),
    })
}

fn conflict_if_unique(e: tokio_postgres::Error, message: impl FnOnce() -> String) -> ApiError {
    if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) {
        ApiError::Conflict(message())
    } else {
        e.into()
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateBucket {
    pub project_id: String,
    pub name: String,
    #[serde(default)]
    pub is_public: bool,
    pub max_file_size: Option<i64>,
    pub allowed_mime_types: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PatchBucket {
    pub project_id: String,
    pub bucket_id: String,
    /// The new name.
    pub name: Option<String>,
    pub is_public: Option<bool>,
    /// `null` removes the limit; absent keeps it.
    #[serde(default, deserialize_with = "present")]
    pub max_file_size: Option<Option<i64>>,
    #[serde(default, deserialize_with = "present")]
    pub allowed_mime_types: Option<Option<Vec<String>>>,
}

/// Tells an explicit `null` (Some(None)) from an absent field (None).
fn present<'de, T: Deserialize<'de>, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

fn validate_limits(max: Option<i64>, mimes: Option<&[String]>) -> ApiResult<()> {
    if max.is_some_and(|m| m <= 0) {
        return Err(ApiError::BadRequest(
            "maxFileSize: expected a positive number of bytes".into(),
        ));
    }
    if let Some(list) = mimes {
        for m in list {
            let ok = m.split_once('/').is_some_and(|(t, s)| {
                !t.is_empty()
                    && !s.is_empty()
                    && (t.to_string() + s)
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"+-.*_".contains(&b))
            });
            if !ok {
                return Err(ApiError::BadRequest(format!(
                    "allowedMimeTypes: {m:?} is not a MIME type or pattern like image/*"
                )));
            }
        }
    }
    Ok(())
}

impl App {
    /// Finds a bucket of the project by UUID or name (a UUID wins).
    pub async fn find_bucket(&self, project_id: &str, id_or_name: &str) -> ApiResult<Bucket> {
        let needle = id_or_name.trim().to_ascii_lowercase();
        let client = self.control.get().await?;
        let statement = client
            .prepare_cached(&format!(
                "SELECT {BUCKET_COLUMNS} FROM fluxbase.storage_buckets
                 WHERE project_id = $1 AND (id::text = $2 OR name = $2)
                 ORDER BY (id::text = $2) DESC LIMIT 1"
            ))
            .await?;
        let row = client
            .query_opt(&statement, &[&project_id, &needle])
            .await?;
        row.map(|r| Bucket::from_row(&r))
            .ok_or_else(|| ApiError::NotFound(format!("No bucket {id_or_name:?} in this project.")))
    }

    pub async fn list_buckets(&self, access: &Access) -> ApiResult<(StatusCode, Value)> {
        let client = self.control.get().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {BUCKET_COLUMNS},
                       (SELECT count(*) FROM fluxbase.storage_files f
                         WHERE f.bucket_id = b.id AND f.size IS NOT NULL AND f.deleting_at IS NULL),
                       (SELECT coalesce(sum(size), 0)::bigint FROM fluxbase.storage_files f
                         WHERE f.bucket_id = b.id AND f.size IS NOT NULL AND f.deleting_at IS NULL)
                     FROM fluxbase.storage_buckets b WHERE project_id = $1 ORDER BY name"
                ),
                &[&access.project.id],
            )
            .await?;
        let mut total: i64 = 0;
        let buckets: Vec<Value> = rows
            .iter()
            .map(|r| {
                let mut b = Bucket::from_row(r).json();
                let size: i64 = r.get(7);
                total += size;
                b["fileCount"] = json!(r.get::<_, i64>(6));
                b["size"] = json!(size);
                b
            })
            .collect();
        Ok((
            StatusCode::OK,
            json!({ "success": true, "buckets": buckets, "totalSize": total }),
        ))
    }

    pub async fn create_bucket(
        &self,
        access: &Access,
        req: CreateBucket,
    ) -> ApiResult<(StatusCode, Value)> {
        access.require_developer("Creating buckets")?;
        names::validate_bucket_name(&req.name)?;
        validate_limits(req.max_file_size, req.allowed_mime_types.as_deref())?;
        let client = self.control.get().await?;
        let row = client
            .query_one(
                &format!(
                    "INSERT INTO fluxbase.storage_buckets
                       (project_id, name, is_public, max_file_size, allowed_mime_types)
                     VALUES ($1, $2, $3, $4, $5) RETURNING {BUCKET_COLUMNS}"
                ),
                &[
                    &access.project.id,
                    &req.name,
                    &req.is_public,
                    &req.max_file_size,
                    &req.allowed_mime_types,
                ],
            )
            .await
            .map_err(|e| {
                conflict_if_unique(e, || {
                    format!(
                        "A bucket named {:?} already exists in this project.",
                        req.name
                    )
                })
            })?;
        let bucket = Bucket::from_row(&row);
        tracing::info!(project_id = %access.project.id, bucket = %bucket.id, name = %bucket.name, "bucket created");
        Ok((
            StatusCode::CREATED,
            json!({ "success": true, "bucket": bucket.json() }),
        ))
    }

    pub async fn patch_bucket(
        &self,
        access: &Access,
        req: PatchBucket,
    ) -> ApiResult<(StatusCode, Value)> {
        access.require_developer("Changing buckets")?;
        if let Some(name) = &req.name {
            names::validate_bucket_name(name)?;
        }
        validate_limits(
            req.max_file_size.flatten(),
            req.allowed_mime_types.as_ref().and_then(|m| m.as_deref()),
        )?;
        let bucket = self.find_bucket(&access.project.id, &req.bucket_id).await?;
        let client = self.control.get().await?;
        let row = client
            .query_one(
                &format!(
                    "UPDATE fluxbase.storage_buckets SET
                       name = coalesce($2, name),
                       is_public = coalesce($3, is_public),
                       max_file_size = CASE WHEN $4 THEN $5 ELSE max_file_size END,
                       allowed_mime_types = CASE WHEN $6 THEN $7 ELSE allowed_mime_types END
                     WHERE id = $1::text::uuid RETURNING {BUCKET_COLUMNS}"
                ),
                &[
                    &bucket.id,
                    &req.name,
                    &req.is_public,
                    &req.max_file_size.is_some(),
                    &req.max_file_size.flatten(),
                    &req.allowed_mime_types.is_some(),
                    &req.allowed_mime_types.clone().flatten(),
                ],
            )
            .await
            .map_err(|e| {
                conflict_if_unique(e, || {
                    format!(
                        "A bucket named {:?} already exists in this project.",
                        req.name.clone().unwrap_or_default()
                    )
                })
            })?;
        Ok((
            StatusCode::OK,
            json!({ "success": true, "bucket": Bucket::from_row(&row).json() }),
        ))
    }

    /// Deletes an empty bucket. The bucket row is locked first, so an upload reserving a file
    /// in it either commits before (and the bucket is not empty) or fails after (no bucket).
    pub async fn delete_bucket(
        &self,
        access: &Access,
        bucket_id: &str,
    ) -> ApiResult<(StatusCode, Value)> {
        access.require_developer("Deleting buckets")?;
        let bucket = self.find_bucket(&access.project.id, bucket_id).await?;
        let mut client = self.control.get().await?;
        let tx = client.transaction().await?;
        let locked = tx
            .query_opt(
                "SELECT 1 FROM fluxbase.storage_buckets WHERE id = $1::text::uuid FOR UPDATE",
                &[&bucket.id],
            )
            .await?;
        if locked.is_none() {
            return Err(ApiError::NotFound(format!(
                "No bucket {bucket_id:?} in this project."
            )));
        }
        let files: i64 = tx
            .query_one(
                "SELECT count(*) FROM fluxbase.storage_files WHERE bucket_id = $1::text::uuid",
                &[&bucket.id],
            )
            .await?
            .get(0);
        if files > 0 {
            return Err(ApiError::Conflict(format!(
                "Bucket {:?} is not empty: it holds {files} file(s). Delete its files first.",
                bucket.name
            )));
        }
        tx.execute(
            "DELETE FROM fluxbase.storage_buckets WHERE id = $1::text::uuid",
            &[&bucket.id],
        )
        .await?;
        tx.commit().await?;
        tracing::info!(project_id = %access.project.id, bucket = %bucket.id, "bucket deleted");
        Ok((
            StatusCode::OK,
            json!({ "success": true, "deleted": { "id": bucket.id, "name": bucket.name } }),
        ))
    }

    pub async fn list_files(
        &self,
        access: &Access,
        bucket_id: &str,
        base: &str,
    ) -> ApiResult<(StatusCode, Value)> {
        let bucket = self.find_bucket(&access.project.id, bucket_id).await?;
        let client = self.control.get().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {FILE_COLUMNS} FROM fluxbase.storage_files f
                     JOIN fluxbase.storage_buckets b ON b.id = f.bucket_id
                     WHERE f.bucket_id = $1::text::uuid AND f.size IS NOT NULL
                       AND f.deleting_at IS NULL
                     ORDER BY f.name"
                ),
                &[&bucket.id],
            )
            .await?;
        let files: Vec<Value> = rows.iter().map(|r| file_json(r, base)).collect();
        Ok((
            StatusCode::OK,
            json!({ "success": true, "bucket": bucket.json(), "files": files }),
        ))
    }

    /// A stored (listed) file of the project by its key.
    async fn stored_file(&self, project_id: &str, s3_key: &str) -> ApiResult<tokio_postgres::Row> {
        let client = self.control.get().await?;
        let statement = client
            .prepare_cached(&format!(
                "SELECT {FILE_COLUMNS} FROM fluxbase.storage_files f
                 JOIN fluxbase.storage_buckets b ON b.id = f.bucket_id
                 WHERE f.project_id = $1 AND f.s3_key = $2 AND f.size IS NOT NULL
                   AND f.deleting_at IS NULL"
            ))
            .await?;
        client
            .query_opt(&statement, &[&project_id, &s3_key])
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("No file with s3Key {s3_key:?}.")))
    }

    /// `GET /api/storage/url`: a download URL valid for 15 minutes.
    pub async fn signed_url(
        &self,
        access: &Access,
        s3_key: &str,
        base: &str,
    ) -> ApiResult<(StatusCode, Value)> {
        let row = self.stored_file(&access.project.id, s3_key).await?;
        let now = self.storage.clock.now();
        let expires_at = now + chrono::Duration::from_std(URL_TTL).expect("15 minutes");
        let url = match self.storage.backend.presign_get(s3_key, URL_TTL).await {
            Some(url) => url?.to_string(),
            None => {
                let expires = expires_at.timestamp();
                let signature = self.storage.signer.sign("GET", s3_key, expires);
                let query = serde_urlencoded::to_string([
                    ("key", s3_key),
                    ("expires", &expires.to_string()),
                    ("signature", &signature),
                ])
                .map_err(anyhow::Error::from)?;
                format!("{base}/api/storage/object?{query}")
            }
        };
        let file = file_json(&row, base);
        Ok((
            StatusCode::OK,
            json!({
                "success": true,
                "url": url,
                "expiresIn": URL_TTL.as_secs(),
                "expiresAt": expires_at,
                "publicUrl": file["public_url"],
                "file": file,
            }),
        ))
    }

    /// `GET /api/storage/object?key&expires&signature`: the local backend's signed download.
    pub async fn signed_download(
        &self,
        key: &str,
        expires: &str,
        signature: &str,
        head: bool,
    ) -> ApiResult<Response> {
        self.storage
            .signer
            .verify("GET", key, expires, signature, self.storage.clock.now())?;
        let project_id = key.split('/').next().unwrap_or_default();
        self.serve_file(project_id, key, false, head).await
    }

    /// `GET /api/storage/public/<key>`: files of public buckets, no credentials.
    pub async fn public_download(&self, encoded_key: &str, head: bool) -> ApiResult<Response> {
        let key = percent_encoding::percent_decode_str(encoded_key)
            .decode_utf8()
            .map_err(|_| ApiError::NotFound("File not found.".into()))?;
        let project_id = key.split('/').next().unwrap_or_default();
        self.serve_file(project_id, &key, true, head).await
    }

    async fn serve_file(
        &self,
        project_id: &str,
        key: &str,
        public_only: bool,
        head: bool,
    ) -> ApiResult<Response> {
        let not_found = || ApiError::NotFound("File not found.".into());
        let project = self
            .auth
            .load_project(project_id)
            .await?
            .ok_or_else(not_found)?;
        if project.status == crate::projects::ProjectStatus::Suspended {
            return Err(ApiError::ProjectSuspended);
        }
        let row = self
            .stored_file(project_id, key)
            .await
            .map_err(|_| not_found())?;
        let (name, content_type, public): (String, String, bool) =
            (row.get(1), row.get(4), row.get(8));
        if public_only && !public {
            return Err(not_found());
        }
        let (size, stream) = self.storage.backend.read(key).await?;
        if !head {
            self.metrics
                .storage_served_bytes
                .fetch_add(size, std::sync::atomic::Ordering::Relaxed);
        }
        let body = if head {
            warp::reply::Response::new(Default::default())
        } else {
            warp::reply::stream(response_body(stream)).into_response()
        };
        let mut response = body;
        let h = response.headers_mut();
        let header = |v: String| {
            warp::http::HeaderValue::from_str(&v).map_err(|e| ApiError::Internal(e.into()))
        };
        h.insert("content-type", header(content_type.clone())?);
        h.insert("content-length", header(size.to_string())?);
        h.insert("x-content-type-options", header("nosniff".into())?);
        // A user's file is never a page of this origin: no scripts, no requests, no forms.
        h.insert(
            "content-security-policy",
            header("default-src 'none'; sandbox".into())?,
        );
        h.insert(
            "content-disposition",
            header(names::content_disposition(&name, &content_type))?,
        );
        h.insert(
            "cache-control",
            header(
                if public {
                    "public, max-age=60"
                } else {
                    "private, no-store"
                }
                .into(),
            )?,
        );
        Ok(response)
    }

    /// Deletes a file: object and metadata, both or neither (see the module docs).
    pub async fn delete_file(
        &self,
        access: &Access,
        file_id: Option<&str>,
        s3_key: Option<&str>,
    ) -> ApiResult<(StatusCode, Value)> {
        access.require_developer("Deleting files")?;
        let (column, value) = match (file_id, s3_key) {
            (Some(id), _) => {
                if !is_uuid(id) {
                    return Err(ApiError::BadRequest("fileId: expected a UUID".into()));
                }
                ("id::text", id.to_ascii_lowercase())
            }
            (None, Some(key)) => ("s3_key", key.to_string()),
            (None, None) => {
                return Err(ApiError::BadRequest(
                    "s3Key: missing (or give fileId)".into(),
                ))
            }
        };
        let client = self.control.get().await?;
        let marked = client
            .query_opt(
                &format!(
                    "UPDATE fluxbase.storage_files SET deleting_at = now()
                     WHERE project_id = $1 AND {column} = $2 AND size IS NOT NULL
                       AND deleting_at IS NULL AND upload_token IS NULL
                     RETURNING id::text, s3_key, name"
                ),
                &[&access.project.id, &value],
            )
            .await?;
        let Some(row) = marked else {
            let busy = client
                .query_opt(
                    &format!(
                        "SELECT 1 FROM fluxbase.storage_files
                         WHERE project_id = $1 AND {column} = $2 AND size IS NOT NULL
                           AND deleting_at IS NULL"
                    ),
                    &[&access.project.id, &value],
                )
                .await?;
            return Err(if busy.is_some() {
                ApiError::Conflict(
                    "An upload of this file is in progress; retry when it is done.".into(),
                )
            } else {
                ApiError::NotFound(format!("No file {value:?} in this project."))
            });
        };
        let (id, key, name): (String, String, String) = (row.get(0), row.get(1), row.get(2));
        if let Err(e) = self.storage.backend.delete(&key).await {
            // Both stay: lift the mark so the file is listed again.
            client
                .execute(
                    "UPDATE fluxbase.storage_files SET deleting_at = NULL WHERE id = $1::text::uuid",
                    &[&id],
                )
                .await?;
            return Err(e);
        }
        client
            .execute(
                "DELETE FROM fluxbase.storage_files WHERE id = $1::text::uuid",
                &[&id],
            )
            .await?;
        tracing::info!(project_id = %access.project.id, file = %id, key, "file deleted");
        Ok((
            StatusCode::OK,
            json!({ "success": true, "deleted": { "id": id, "name": name, "s3_key": key } }),
        ))
    }

    /// Removes every object of a deleted project (its rows go with the project's).
    pub async fn delete_project_objects(&self, project_id: &str) {
        match self.storage.backend.delete_prefix(project_id).await {
            Ok(n) => tracing::info!(project_id, objects = n, "project storage deleted"),
            Err(e) => tracing::warn!(project_id, error = %e, "deleting the project's objects"),
        }
    }

    /// Moves objects that versions before this one stored under object_store's encoded form
    /// of their key to the key itself (see [`Backend::migrate_legacy`]): once, at start-up,
    /// before the sweep and before any request, so that nothing at run time looks for an
    /// object anywhere but under its key. An encoded path that is another file's key is left
    /// alone (that object may be the other file's). Returns how many objects moved.
    pub async fn migrate_legacy_objects(&self) -> anyhow::Result<usize> {
        let client = self.control.get().await?;
        let keys: std::collections::HashSet<String> = client
            .query("SELECT s3_key FROM fluxbase.storage_files", &[])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        drop(client);
        let mut moved = 0;
        for key in &keys {
            match self
                .storage
                .backend
                .migrate_legacy(key, |k| keys.contains(k))
                .await
            {
                Ok(true) => moved += 1,
                Ok(false) => {}
                Err(e) => tracing::warn!(key, error = %e, "moving an object to its key"),
            }
        }
        if moved > 0 {
            tracing::info!(
                objects = moved,
                "objects of an older version moved to their keys"
            );
        }
        Ok(moved)
    }

    /// Finishes what a crash interrupted: marked deletes, abandoned reservations and staged
    /// uploads older than an hour.
    pub async fn sweep_storage(&self) -> anyhow::Result<()> {
        let client = self.control.get().await?;
        let cutoff = Utc::now() - chrono::Duration::seconds(ABANDONED_AFTER_SECS);
        let deleting = client
            .query(
                "SELECT id::text, s3_key FROM fluxbase.storage_files WHERE deleting_at IS NOT NULL",
                &[],
            )
            .await?;
        for r in deleting {
            let (id, key): (String, String) = (r.get(0), r.get(1));
            if self.storage.backend.delete(&key).await.is_ok() {
                client
                    .execute(
                        "DELETE FROM fluxbase.storage_files WHERE id = $1::text::uuid",
                        &[&id],
                    )
                    .await?;
            }
        }
        let abandoned = client
            .query(
                "SELECT id::text, s3_key FROM fluxbase.storage_files
                 WHERE size IS NULL AND upload_started_at < $1",
                &[&cutoff],
            )
            .await?;
        for r in abandoned {
            let (id, key): (String, String) = (r.get(0), r.get(1));
            if self.storage.backend.delete(&key).await.is_ok() {
                client
                    .execute(
                        "DELETE FROM fluxbase.storage_files WHERE id = $1::text::uuid AND size IS NULL",
                        &[&id],
                    )
                    .await?;
            }
        }
        client
            .execute(
                "UPDATE fluxbase.storage_files SET upload_token = NULL, upload_started_at = NULL
                 WHERE upload_token IS NOT NULL AND upload_started_at < $1",
                &[&cutoff],
            )
            .await?;
        for key in self
            .storage
            .backend
            .list_older_than(STAGING, cutoff)
            .await?
        {
            let _ = self.storage.backend.delete(&key).await;
        }
        Ok(())
    }
}

pub fn is_uuid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// A file's chunks as a response body: warp wants a `Sync` stream, so they travel through a
/// bounded channel from a task that reads at most a few chunks ahead of the client.
pub fn response_body<S>(
    stream: S,
) -> impl futures_util::Stream<Item = std::io::Result<bytes::Bytes>> + Send + Sync + 'static
where
    S: futures_util::Stream<Item = std::io::Result<bytes::Bytes>> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<bytes::Bytes>>(4);
    tokio::spawn(async move {
        use futures_util::StreamExt;
        let mut stream = std::pin::pin!(stream);
        while let Some(chunk) = stream.next().await {
            if tx.send(chunk).await.is_err() {
                return;
            }
        }
    });
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) })
}
