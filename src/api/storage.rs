//! Storage: buckets, files, signed and public downloads.
//!
//! The HTTP side of [`crate::storage`]: who is asking (the caller's access, resolved here and
//! handed to the domain; for an upload, once the form names the project), the values a request
//! carries (headers, the `Host` a link is built on), and the responses (JSON bodies; a download's
//! headers and streamed body). [`StorageError`] maps to the guide's status and code in one
//! `From` impl.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use warp::http::{header, HeaderMap, HeaderValue, StatusCode};
use warp::reply::Response;
use warp::Reply as _;

use super::reply::{Created, Json, Reply};
use super::Request;
use crate::api::error::{ApiError, ApiResult};
use crate::app::{App, SharedApp};
use crate::auth::{Access, DbRole, Principal, Scope};
use crate::config::Config;
use crate::storage::backend::ObjectBody;
use crate::storage::files::{project_of_key, DeletedFile};
use crate::storage::signing::Grant;
use crate::storage::{
    public_url, Bucket, BucketChange, BucketUsage, NewBucket, StorageError, StoredFile,
    UploadRequest, URL_TTL,
};

impl From<StorageError> for ApiError {
    fn from(e: StorageError) -> ApiError {
        use StorageError::*;
        match e {
            InvalidBucketName(_)
            | InvalidObjectName { .. }
            | FolderWithoutFilename
            | NoFilename
            | InvalidContentType(_)
            | InvalidMaxFileSize
            | InvalidMimePattern(_)
            | TypeNotAllowed { .. }
            | InvalidFileId
            | NoFileNamed
            | NotMultipart
            | InvalidMultipart(_)
            | NotABoolean(_)
            | UnknownField(_)
            | FieldTooLong { .. }
            | FieldNotUtf8(_)
            | SeveralFiles
            | NoFile
            | MissingField(_) => ApiError::BadRequest(e.to_string()),
            TooLarge(limit) => ApiError::PayloadTooLarge(limit as usize),
            BodyStalled(crate::error::BodyStalled(secs)) => ApiError::BodyStalled(secs),
            NoSuchBucket(_) | BucketDeleted(_) | NoSuchKey(_) | NoSuchFile(_) | NotServed => {
                ApiError::NotFound(e.to_string())
            }
            BucketExists(_)
            | BucketNotEmpty { .. }
            | FileExists { .. }
            | UploadInProgress
            | FileBusy(_)
            | NameConflict { .. }
            | PathInUse(_) => ApiError::Conflict(e.to_string()),
            InvalidSignature | UrlExpired => ApiError::AccessDenied(e.to_string()),
            Unavailable(cause) => ApiError::StorageUnavailable(cause),
            Internal(e) => ApiError::from(e),
        }
    }
}

/// The base URL for links: `FLUXBASE_PUBLIC_URL`, else the `Host` the caller used.
pub fn base_url(config: &Config, headers: &HeaderMap) -> String {
    if let Some(url) = &config.public_url {
        return url.trim_end_matches('/').to_string();
    }
    match headers
        .get(header::HOST)
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
fn require_readwrite(access: &Access, what: &str) -> ApiResult<()> {
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

/// A bucket.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BucketInfo {
    /// A UUID.
    id: String,
    name: String,
    is_public: bool,
    /// Bytes; `null`: only the server's upload limit applies.
    max_file_size: Option<i64>,
    /// MIME types or patterns (`image/*`); `null`: any type.
    allowed_mime_types: Option<Vec<String>>,
    #[schema(value_type = String, format = DateTime)]
    created_at: DateTime<Utc>,
}

impl From<Bucket> for BucketInfo {
    fn from(b: Bucket) -> BucketInfo {
        BucketInfo {
            id: b.id,
            name: b.name,
            is_public: b.is_public,
            max_file_size: b.max_file_size,
            allowed_mime_types: b.allowed_mime_types,
            created_at: b.created_at,
        }
    }
}

/// A bucket with its listed files' count and bytes.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BucketWithUsage {
    #[serde(flatten)]
    bucket: BucketInfo,
    file_count: i64,
    /// Bytes.
    size: i64,
}

/// A file, in the guide's snake_case.
#[derive(Serialize, ToSchema)]
pub struct FileInfo {
    /// A UUID.
    id: String,
    /// The name inside its bucket.
    name: String,
    /// `<projectId>/<bucketId>/<name>`.
    s3_key: String,
    /// Bytes.
    size: Option<i64>,
    content_type: String,
    bucket_id: String,
    #[schema(value_type = String, format = DateTime)]
    created_at: DateTime<Utc>,
    #[schema(value_type = String, format = DateTime)]
    updated_at: DateTime<Utc>,
    /// The file's permanent URL when its bucket is public, else `null`.
    public_url: Option<String>,
}

impl FileInfo {
    /// `base`: this server as the caller reaches it ([`base_url`]).
    fn new(f: StoredFile, base: &str) -> FileInfo {
        FileInfo {
            public_url: f.bucket_is_public.then(|| public_url(base, &f.s3_key)),
            id: f.id,
            name: f.name,
            s3_key: f.s3_key,
            size: f.size,
            content_type: f.content_type,
            bucket_id: f.bucket_id,
            created_at: f.created_at,
            updated_at: f.updated_at,
        }
    }
}

/// The project's buckets.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BucketList {
    success: bool,
    buckets: Vec<BucketWithUsage>,
    /// Bytes in all buckets.
    total_size: i64,
}

/// A bucket as created or changed.
#[derive(Serialize, ToSchema)]
pub struct BucketReply {
    success: bool,
    bucket: BucketInfo,
}

/// A deleted bucket.
#[derive(Serialize, ToSchema)]
pub struct BucketDeleted {
    success: bool,
    deleted: DeletedBucket,
}

#[derive(Serialize, ToSchema)]
pub struct DeletedBucket {
    id: String,
    name: String,
}

/// A bucket's files.
#[derive(Serialize, ToSchema)]
pub struct FileList {
    success: bool,
    bucket: BucketInfo,
    /// In name order (bytewise): at most `limit`, from `after`, under `prefix`.
    files: Vec<FileInfo>,
    /// More files follow: ask again with `after` = `nextAfter`.
    truncated: bool,
    /// The last name of this page when `truncated`, else `null`.
    #[serde(rename = "nextAfter")]
    next_after: Option<String>,
}

/// A download URL valid for 15 minutes.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DownloadUrl {
    success: bool,
    url: String,
    /// Seconds.
    expires_in: u64,
    #[schema(value_type = String, format = DateTime)]
    expires_at: DateTime<Utc>,
    /// The file's permanent URL when its bucket is public, else `null`.
    public_url: Option<String>,
    file: FileInfo,
}

/// An uploaded file.
#[derive(Serialize, ToSchema)]
pub struct FileReply {
    success: bool,
    file: FileInfo,
}

/// A deleted file.
#[derive(Serialize, ToSchema)]
pub struct FileDeleted {
    success: bool,
    deleted: DeletedFileInfo,
}

#[derive(Serialize, ToSchema)]
pub struct DeletedFileInfo {
    id: String,
    name: String,
    s3_key: String,
}

impl From<DeletedFile> for DeletedFileInfo {
    fn from(f: DeletedFile) -> DeletedFileInfo {
        DeletedFileInfo {
            id: f.id,
            name: f.name,
            s3_key: f.s3_key,
        }
    }
}

/// A new bucket.
#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateBucket {
    /// The project.
    #[allow(dead_code)] // Resolved before the body is typed (`Request::access_by_body`).
    project_id: String,
    /// Lowercase letters, digits, hyphens and underscores, 1–63 characters; unique per project.
    name: String,
    /// Files of a public bucket have a permanent URL that needs no credential.
    #[serde(default)]
    is_public: bool,
    /// Bytes (positive).
    max_file_size: Option<i64>,
    /// MIME types or patterns such as `image/*`.
    allowed_mime_types: Option<Vec<String>>,
}

/// What changes in a bucket; an absent field keeps its value.
#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PatchBucket {
    /// The project.
    #[allow(dead_code)] // Resolved before the body is typed (`Request::access_by_body`).
    project_id: String,
    /// The bucket's UUID or name.
    bucket_id: String,
    /// The new name.
    name: Option<String>,
    is_public: Option<bool>,
    /// `null` removes the limit; absent keeps it.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<i64>)]
    max_file_size: Option<Option<i64>>,
    /// `null` allows every type; absent keeps the list.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<Vec<String>>)]
    allowed_mime_types: Option<Option<Vec<String>>>,
}

/// Tells an explicit `null` (Some(None)) from an absent field (None).
fn present<'de, T: Deserialize<'de>, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// The upload form: `file` plus `bucketId` and `projectId` (in any order; the guide's curl
/// sends `file` first).
#[derive(ToSchema)]
#[schema(rename_all = "camelCase")]
#[allow(dead_code)] // Only described: the form is read as a stream (crate::storage::upload).
pub struct UploadForm {
    #[schema(value_type = String, format = Binary)]
    file: Vec<u8>,
    /// The bucket's UUID or name.
    bucket_id: String,
    project_id: String,
    /// The file's name in the bucket (`a/b.png`); a trailing `/` puts the uploaded file's own
    /// name in that folder. Default: the uploaded file's name.
    path: Option<String>,
    /// Replace an existing file of the same name.
    upsert: Option<bool>,
}

/// The project's buckets.
#[utoipa::path(get, path = "/api/storage/buckets", tag = "storage", security(("bearer" = [])),
    params(("projectId" = String, Query, description = "The project")),
    responses((status = 200, description = "The buckets and their sizes", body = BucketList)))]
pub async fn list_buckets(app: SharedApp, req: Request) -> ApiResult<Json<BucketList>> {
    let access = req.access_by_query(&app).await?;
    let buckets = app.storage.list_buckets(&access.project.id).await?;
    let total_size = buckets.iter().map(|b| b.size).sum();
    Ok(Json(BucketList {
        success: true,
        buckets: buckets
            .into_iter()
            .map(
                |BucketUsage {
                     bucket,
                     file_count,
                     size,
                 }| BucketWithUsage {
                    bucket: bucket.into(),
                    file_count,
                    size,
                },
            )
            .collect(),
        total_size,
    }))
}

/// Creates a bucket.
#[utoipa::path(post, path = "/api/storage/buckets", tag = "storage", security(("bearer" = [])),
    request_body = CreateBucket,
    responses((status = 201, description = "The new bucket", body = BucketReply)))]
pub async fn create_bucket(app: SharedApp, req: Request) -> ApiResult<Created<BucketReply>> {
    let access = req.access_by_body(&app).await?;
    let body: CreateBucket = req.json()?;
    access.require_developer("Creating buckets")?;
    let new = NewBucket {
        name: body.name,
        is_public: body.is_public,
        max_file_size: body.max_file_size,
        allowed_mime_types: body.allowed_mime_types,
    };
    let bucket = app.storage.create_bucket(&access.project.id, new).await?;
    Ok(Created(BucketReply {
        success: true,
        bucket: bucket.into(),
    }))
}

/// Renames a bucket or changes its visibility and limits.
#[utoipa::path(patch, path = "/api/storage/buckets", tag = "storage", security(("bearer" = [])),
    request_body = PatchBucket,
    responses((status = 200, description = "The bucket as changed", body = BucketReply)))]
pub async fn patch_bucket(app: SharedApp, req: Request) -> ApiResult<Json<BucketReply>> {
    let access = req.access_by_body(&app).await?;
    let body: PatchBucket = req.json()?;
    access.require_developer("Changing buckets")?;
    let change = BucketChange {
        name: body.name,
        is_public: body.is_public,
        max_file_size: body.max_file_size,
        allowed_mime_types: body.allowed_mime_types,
    };
    let bucket = app
        .storage
        .change_bucket(&access.project.id, &body.bucket_id, change)
        .await?;
    Ok(Json(BucketReply {
        success: true,
        bucket: bucket.into(),
    }))
}

/// Deletes an empty bucket.
#[utoipa::path(delete, path = "/api/storage/buckets", tag = "storage", security(("bearer" = [])),
    params(("projectId" = String, Query, description = "The project"),
           ("bucketId" = String, Query, description = "The bucket's UUID or name")),
    responses((status = 200, description = "The deleted bucket", body = BucketDeleted)))]
pub async fn delete_bucket(app: SharedApp, req: Request) -> ApiResult<Json<BucketDeleted>> {
    let access = req.access_by_query(&app).await?;
    let bucket_id = req.param("bucketId")?;
    access.require_developer("Deleting buckets")?;
    let bucket = app
        .storage
        .delete_bucket(&access.project.id, bucket_id)
        .await?;
    Ok(Json(BucketDeleted {
        success: true,
        deleted: DeletedBucket {
            id: bucket.id,
            name: bucket.name,
        },
    }))
}

/// Uploads a file (multipart form: `file`, with `projectId` and `bucketId` in the form); the
/// body streams to the backend. 201 for a new file, 200 for a replaced one (`upsert`).
#[utoipa::path(post, path = "/api/storage/upload", tag = "storage", security(("bearer" = [])),
    params(("upsert" = Option<bool>, Query, description = "Replace an existing file of the same name")),
    request_body(content = UploadForm, content_type = "multipart/form-data"),
    responses((status = 201, description = "The new file", body = FileReply),
              (status = 200, description = "The replaced file (`upsert`)", body = FileReply)))]
pub async fn upload_file(app: SharedApp, mut req: Request) -> ApiResult<Response> {
    let principal = req.principal(&app).await?;
    if let Principal::Key {
        scope: Scope::Read, ..
    } = principal
    {
        return Err(ApiError::ScopeMismatch(
            "Uploading files needs a readwrite or admin key.".into(),
        ));
    }
    let body = req.take_stream();
    let header = |name: header::HeaderName| req.headers.get(name).and_then(|v| v.to_str().ok());
    let content_type = header(header::CONTENT_TYPE).unwrap_or_default().to_string();
    let content_length = header(header::CONTENT_LENGTH).and_then(|v| v.parse().ok());
    let upsert = req.optional_param("upsert").map(str::to_string);
    let asked = Arc::new(std::sync::Mutex::new(None::<String>));
    // Owned, so that the upload runs to its end if the client goes (`to_completion`).
    let (app_owned, asked_owned) = (app.clone(), asked.clone());
    let work = async move {
        let request = UploadRequest {
            content_type: &content_type,
            content_length,
            upsert: upsert.as_deref(),
        };
        let (app_ref, principal, asked_ref) = (&*app_owned, &principal, &*asked_owned);
        let authorize = move |project_id: String| async move {
            let access = app_ref.auth.project_access(principal, &project_id).await?;
            require_readwrite(&access, "Uploading files")?;
            *asked_ref.lock().expect("poisoned") = Some(project_id);
            Ok::<_, ApiError>(access)
        };
        app_owned.storage.upload(request, body, authorize).await
    };
    let uploaded = match super::to_completion(work).await? {
        Ok(uploaded) => uploaded,
        Err(e) => {
            let project_id = asked.lock().expect("poisoned").take();
            return Err(unless_project_deleted(&app, project_id, e).await);
        }
    };
    let reply = FileReply {
        success: true,
        file: FileInfo::new(uploaded.file, &base_url(&app.config, &req.headers)),
    };
    Ok(if uploaded.created {
        Created(reply).into_response()
    } else {
        Json(reply).into_response()
    })
}

/// An upload's error, or 404 `PROJECT_NOT_FOUND` when its project was deleted while the body
/// arrived (its buckets, rows and directory go with it): "no bucket" or "unavailable" would send
/// the client looking for a bucket in a project that is gone, where statements cut off the same
/// way answer `PROJECT_NOT_FOUND` (red team rt7 LOW 6). Only these errors cost the check.
async fn unless_project_deleted(
    app: &SharedApp,
    project_id: Option<String>,
    e: ApiError,
) -> ApiError {
    let lost = matches!(
        &e,
        ApiError::NotFound(_) | ApiError::StorageUnavailable(_) | ApiError::Internal(_)
    );
    let Some(project_id) = project_id.filter(|_| lost) else {
        return e;
    };
    if app.is_being_deleted(&project_id) {
        return ApiError::ProjectNotFound;
    }
    match app.auth.project_gone(&project_id).await {
        Ok(true) => ApiError::ProjectNotFound,
        _ => e,
    }
}

/// The files of a bucket.
#[utoipa::path(get, path = "/api/storage/files", tag = "storage", security(("bearer" = [])),
    params(("projectId" = String, Query, description = "The project"),
           ("bucketId" = String, Query, description = "The bucket's UUID or name"),
           ("prefix" = Option<String>, Query, description = "Only names starting with this (a folder: `reports/`)"),
           ("after" = Option<String>, Query, description = "Only names after this one (the `nextAfter` of the page before)"),
           ("limit" = Option<u32>, Query, description = "At most this many files (1 to 10000, the default)")),
    responses((status = 200, description = "The bucket and a page of its files", body = FileList)))]
pub async fn list_files(app: SharedApp, req: Request) -> ApiResult<Json<FileList>> {
    let access = req.access_by_query(&app).await?;
    let base = base_url(&app.config, &req.headers);
    let limit = match req.optional_param("limit") {
        None => crate::storage::files::MAX_LIST,
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=crate::storage::files::MAX_LIST).contains(n))
            .ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "limit: expected 1 to {}",
                    crate::storage::files::MAX_LIST
                ))
            })?,
    };
    let page = crate::storage::files::FilePage {
        prefix: req.optional_param("prefix").unwrap_or("").to_string(),
        after: req.optional_param("after").map(str::to_string),
        limit,
    };
    let (bucket, files, truncated) = app
        .storage
        .list_files(&access.project.id, req.param("bucketId")?, &page)
        .await?;
    let next_after = truncated
        .then(|| files.last().map(|f| f.name.clone()))
        .flatten();
    Ok(Json(FileList {
        success: true,
        bucket: bucket.into(),
        files: files.into_iter().map(|f| FileInfo::new(f, &base)).collect(),
        truncated,
        next_after,
    }))
}

/// A signed download URL for a file.
#[utoipa::path(get, path = "/api/storage/url", tag = "storage", security(("bearer" = [])),
    params(("projectId" = String, Query, description = "The project"),
           ("s3Key" = String, Query, description = "The file's key")),
    responses((status = 200, description = "A URL valid for 15 minutes", body = DownloadUrl)))]
pub async fn signed_url(app: SharedApp, req: Request) -> ApiResult<Json<DownloadUrl>> {
    let access = req.access_by_query(&app).await?;
    let base = base_url(&app.config, &req.headers);
    // The URL ends with the access of whoever asked for it (a local URL; S3's own are S3's).
    let grant = match &access.principal {
        Principal::Key {
            key_id, key_hash, ..
        } => app.storage.key_grant(key_id, key_hash),
        Principal::Session { user_id, .. } => Grant::Member {
            user_id: user_id.clone(),
        },
    };
    let signed = app
        .storage
        .signed_url(&access.project.id, req.param("s3Key")?, &base, &grant)
        .await?;
    let file = FileInfo::new(signed.file, &base);
    Ok(Json(DownloadUrl {
        success: true,
        url: signed.url,
        expires_in: URL_TTL.as_secs(),
        expires_at: signed.expires_at,
        public_url: file.public_url.clone(),
        file,
    }))
}

/// Deletes a file, named by `fileId` or `s3Key` (query string or JSON body).
#[utoipa::path(delete, path = "/api/storage/files", tag = "storage", security(("bearer" = [])),
    params(("projectId" = Option<String>, Query, description = "The project"),
           ("fileId" = Option<String>, Query, description = "The file's id"),
           ("s3Key" = Option<String>, Query, description = "The file's key")),
    request_body = Option<DeleteFile>,
    responses((status = 200, description = "The deleted file", body = FileDeleted)))]
pub async fn delete_file(app: SharedApp, req: Request) -> ApiResult<Json<FileDeleted>> {
    delete(app, req).await
}

/// The guide's spelling of [`delete_file`].
#[utoipa::path(delete, path = "/api/storage/delete", tag = "storage", security(("bearer" = [])),
    params(("projectId" = Option<String>, Query, description = "The project"),
           ("fileId" = Option<String>, Query, description = "The file's id"),
           ("s3Key" = Option<String>, Query, description = "The file's key")),
    request_body = Option<DeleteFile>,
    responses((status = 200, description = "The deleted file", body = FileDeleted)))]
pub async fn delete_file_legacy(app: SharedApp, req: Request) -> ApiResult<Json<FileDeleted>> {
    delete(app, req).await
}

async fn delete(app: SharedApp, req: Request) -> ApiResult<Json<FileDeleted>> {
    let principal = req.principal(&app).await?;
    let target = DeleteFile::from_request(&req)?;
    let access = app
        .auth
        .project_access(&principal, &target.project_id)
        .await?;
    access.require_developer("Deleting files")?;
    let deleted = app
        .storage
        .delete_file(
            &access.project.id,
            target.file_id.as_deref(),
            target.s3_key.as_deref(),
        )
        .await?;
    Ok(Json(FileDeleted {
        success: true,
        deleted: deleted.into(),
    }))
}

/// The file to delete: `?projectId=&s3Key=` or `?projectId=&fileId=`, or the same fields in
/// a JSON body.
#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeleteFile {
    /// The project.
    project_id: String,
    /// The file's id (wins over `s3Key`).
    file_id: Option<String>,
    s3_key: Option<String>,
}

impl DeleteFile {
    fn from_request(req: &Request) -> ApiResult<DeleteFile> {
        if req.query.contains_key("projectId") || !req.has_body() {
            let get = |k: &str| req.query.get(k).filter(|v| !v.is_empty()).cloned();
            return Ok(DeleteFile {
                project_id: req.param("projectId")?.to_string(),
                file_id: get("fileId"),
                s3_key: get("s3Key"),
            });
        }
        req.json()
    }
}

/// A file through a signed URL (no credential: the signature is the grant).
#[utoipa::path(get, path = "/api/storage/object", tag = "storage",
    params(("key" = String, Query, description = "The file's key"),
           ("expires" = String, Query, description = "Unix seconds"),
           ("grant" = Option<String>, Query, description = "Whom the URL was signed for (an API key or a member); checked at each download"),
           ("signature" = String, Query, description = "HMAC of key, expiry and grant")),
responses((status = 200, description = "The file's bytes, with the type it was uploaded with", content_type = "*/*",
        headers(("content-disposition" = String, description = "inline or attachment, with the file's name"),
                ("content-security-policy" = String, description = "`default-src 'none'; sandbox`: a file is never a page of this origin"),
                ("cache-control" = String, description = "public files `public, max-age=60`, private ones `private, no-store`"),
                ("etag" = String, description = "A strong entity tag of this version of the file"),
                ("last-modified" = String, description = "When the file last changed"),
                ("accept-ranges" = String, description = "`bytes`"))),
        (status = 206, description = "The bytes of the one range `Range: bytes=…` asked for, with `Content-Range`", content_type = "*/*"),
        (status = 304, description = "`If-None-Match` or `If-Modified-Since`: the client's copy is this version"),
        (status = 412, description = "`If-Match` or `If-Unmodified-Since` named another version of the file", body = crate::api::openapi::ErrorBody),
        (status = 416, description = "`Range` starts at or past the file's end; `Content-Range: bytes */<size>`", body = crate::api::openapi::ErrorBody)))]
pub async fn signed_download(app: SharedApp, req: Request) -> ApiResult<Response> {
    signed(app, req, false).await
}

/// The headers of [`signed_download`], without the body.
#[utoipa::path(head, path = "/api/storage/object", tag = "storage",
    params(("key" = String, Query, description = "The file's key"),
           ("expires" = String, Query, description = "Unix seconds"),
           ("grant" = Option<String>, Query, description = "Whom the URL was signed for (an API key or a member); checked at each download"),
           ("signature" = String, Query, description = "HMAC of key, expiry and grant")),
    responses((status = 200, description = "The file's headers (a `HEAD` ignores `Range`)"),
        (status = 304, description = "`If-None-Match` or `If-Modified-Since`: the client's copy is this version"),
        (status = 412, description = "`If-Match` or `If-Unmodified-Since` named another version of the file", body = crate::api::openapi::ErrorBody)))]
pub async fn signed_download_head(app: SharedApp, req: Request) -> ApiResult<Response> {
    signed(app, req, true).await
}

async fn signed(app: SharedApp, req: Request, head: bool) -> ApiResult<Response> {
    let key = req.param("key")?;
    let (expires, signature) = (req.param("expires")?, req.param("signature")?);
    let grant = app
        .storage
        .verify_signed(key, expires, req.optional_param("grant"), signature)?;
    if let Some(grant) = grant {
        still_granted(&app, project_of_key(key), &grant).await?;
    }
    serve(&app, key, false, head, &req.headers, req.client).await
}

/// Whether whoever a signed URL was made for still has access to its project: the API key
/// with the same secret (not deleted, not rotated since), or a member still a member. 403
/// `ACCESS_DENIED` otherwise, as for an altered URL.
async fn still_granted(app: &App, project_id: &str, grant: &Grant) -> ApiResult<()> {
    let granted = match grant {
        Grant::Key {
            key_id,
            fingerprint,
        } => app
            .auth
            .key_secret(project_id, key_id)
            .await?
            .is_some_and(|hash| app.storage.fingerprint_matches(fingerprint, &hash)),
        Grant::Member { user_id } => app.auth.is_member_cached(project_id, user_id).await?,
    };
    if granted {
        return Ok(());
    }
    Err(ApiError::AccessDenied(
        match grant {
            Grant::Key { .. } => {
                "This URL was signed for an API key that has since been deleted or rotated."
            }
            Grant::Member { .. } => {
                "This URL was signed for a member who has since left the project."
            }
        }
        .into(),
    ))
}

/// A file of a public bucket, at `/api/storage/public/<projectId>/<bucket>/<path>`.
#[utoipa::path(get, path = "/api/storage/public/{path}", tag = "storage",
    params(("path" = String, Path, description = "`<projectId>/<bucket>/<file path>`, percent-encoded")),
responses((status = 200, description = "The file's bytes, with the type it was uploaded with", content_type = "*/*",
        headers(("content-disposition" = String, description = "inline or attachment, with the file's name"),
                ("content-security-policy" = String, description = "`default-src 'none'; sandbox`: a file is never a page of this origin"),
                ("cache-control" = String, description = "public files `public, max-age=60`, private ones `private, no-store`"),
                ("etag" = String, description = "A strong entity tag of this version of the file"),
                ("last-modified" = String, description = "When the file last changed"),
                ("accept-ranges" = String, description = "`bytes`"))),
        (status = 206, description = "The bytes of the one range `Range: bytes=…` asked for, with `Content-Range`", content_type = "*/*"),
        (status = 304, description = "`If-None-Match` or `If-Modified-Since`: the client's copy is this version"),
        (status = 412, description = "`If-Match` or `If-Unmodified-Since` named another version of the file", body = crate::api::openapi::ErrorBody),
        (status = 416, description = "`Range` starts at or past the file's end; `Content-Range: bytes */<size>`", body = crate::api::openapi::ErrorBody)))]
pub async fn public_download(app: SharedApp, req: Request) -> ApiResult<Response> {
    public(app, req, false).await
}

/// The headers of [`public_download`], without the body.
#[utoipa::path(head, path = "/api/storage/public/{path}", tag = "storage",
    params(("path" = String, Path, description = "`<projectId>/<bucket>/<file path>`, percent-encoded")),
    responses((status = 200, description = "The file's headers (a `HEAD` ignores `Range`)"),
        (status = 304, description = "`If-None-Match` or `If-Modified-Since`: the client's copy is this version"),
        (status = 412, description = "`If-Match` or `If-Unmodified-Since` named another version of the file", body = crate::api::openapi::ErrorBody)))]
pub async fn public_download_head(app: SharedApp, req: Request) -> ApiResult<Response> {
    public(app, req, true).await
}

async fn public(app: SharedApp, req: Request, head: bool) -> ApiResult<Response> {
    let key = percent_encoding::percent_decode_str(&req.tail)
        .decode_utf8()
        .map_err(|_| ApiError::from(StorageError::NotServed))?;
    serve(&app, &key, true, head, &req.headers, req.client).await
}

/// The response for a download: the file's type, length and disposition, a sandboxing CSP, a
/// cache policy by the bucket's visibility, its validators; the body is one buffer (a small local
/// file) or streams (none for `HEAD`). A range or a precondition in `headers` makes it a 206
/// with `Content-Range`, a 304 or a 416 ([`crate::storage::ranges`]).
async fn serve(
    app: &App,
    key: &str,
    public_only: bool,
    head: bool,
    headers: &HeaderMap,
    client: Option<std::net::IpAddr>,
) -> ApiResult<Response> {
    use crate::storage::ranges::{Conditions, Outcome};
    let project = app
        .auth
        .load_project(project_of_key(key))
        .await?
        .ok_or(StorageError::NotServed)?;
    if project.status == crate::projects::ProjectStatus::Suspended {
        return Err(ApiError::ProjectSuspended);
    }
    // Several lines of one header are one list (a second `Range` line makes it ignored).
    let conditions = Conditions::from_headers(!head, |name| {
        let values: Vec<&str> = headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        (!values.is_empty()).then(|| values.join(", "))
    });
    let download = app
        .storage
        .download(key, public_only, !head, &conditions, client)
        .await?;
    match download.outcome {
        Outcome::Unsatisfiable => return Err(ApiError::RangeNotSatisfiable(download.total)),
        Outcome::PreconditionFailed => return Err(ApiError::PreconditionFailed),
        _ => {}
    }
    if !head {
        app.metrics
            .storage_served_bytes
            .fetch_add(download.size, Relaxed);
    }
    let header = |v: String| HeaderValue::from_str(&v).map_err(|e| ApiError::Internal(e.into()));
    let disposition = header(download.content_disposition())?;
    let status = match download.outcome {
        Outcome::NotModified => StatusCode::NOT_MODIFIED,
        Outcome::Part { .. } => StatusCode::PARTIAL_CONTENT,
        _ => StatusCode::OK,
    };
    let mut response = match download.body {
        _ if head || download.outcome == Outcome::NotModified => Response::new(Default::default()),
        ObjectBody::Whole(bytes) => Response::new(bytes.into()),
        ObjectBody::Stream(body) => warp::reply::stream(response_body(body)).into_response(),
    };
    *response.status_mut() = status;
    let h = response.headers_mut();
    h.insert("etag", header(download.validators.etag.clone())?);
    if let Some(date) = download.validators.last_modified() {
        h.insert("last-modified", header(date)?);
    }
    h.insert(
        "cache-control",
        header(
            if download.public {
                "public, max-age=60"
            } else {
                "private, no-store"
            }
            .into(),
        )?,
    );
    h.insert("x-content-type-options", header("nosniff".into())?);
    if download.outcome == Outcome::NotModified {
        return Ok(response);
    }
    if let Outcome::Part { start, len } = download.outcome {
        let last = start + len - 1;
        h.insert(
            "content-range",
            header(format!("bytes {start}-{last}/{}", download.total))?,
        );
    }
    h.insert("accept-ranges", header("bytes".into())?);
    h.insert("content-type", header(download.content_type.clone())?);
    h.insert("content-length", header(download.size.to_string())?);
    // A user's file is never a page of this origin: no scripts, no requests, no forms.
    h.insert(
        "content-security-policy",
        header("default-src 'none'; sandbox".into())?,
    );
    h.insert("content-disposition", disposition);
    Ok(response)
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

#[cfg(test)]
mod tests {
    use super::*;
    use warp::http::StatusCode;

    fn answer(e: StorageError) -> (StatusCode, &'static str, String) {
        let e = ApiError::from(e);
        (e.status(), e.code(), e.to_string())
    }

    #[test]
    fn storage_errors_keep_the_guides_status_code_and_message() {
        assert_eq!(
            answer(StorageError::BucketExists("photos".into())),
            (
                StatusCode::CONFLICT,
                "CONFLICT",
                "A bucket named \"photos\" already exists in this project.".into()
            )
        );
        assert_eq!(
            answer(StorageError::MissingField("bucketId")),
            (
                StatusCode::BAD_REQUEST,
                "BAD_REQUEST",
                "bucketId: missing form field".into()
            )
        );
        assert_eq!(
            answer(StorageError::TooLarge(1024)),
            (
                StatusCode::PAYLOAD_TOO_LARGE,
                "PAYLOAD_TOO_LARGE",
                "Request body is larger than the limit of 1024 bytes.".into()
            )
        );
        assert_eq!(
            answer(StorageError::NotServed),
            (StatusCode::NOT_FOUND, "NOT_FOUND", "File not found.".into())
        );
        assert_eq!(
            answer(StorageError::UrlExpired),
            (
                StatusCode::FORBIDDEN,
                "ACCESS_DENIED",
                "The URL has expired.".into()
            )
        );
        // A name that would be a file and a folder: a conflict naming both paths, for good.
        let (status, code, message) = answer(StorageError::NameConflict {
            name: "a".into(),
            bucket: "docs".into(),
            existing: "a/b.txt".into(),
        });
        assert_eq!((status, code), (StatusCode::CONFLICT, "CONFLICT"));
        assert_eq!(
            message,
            "Cannot store \"a\" in bucket \"docs\": \"a\" is a folder there (it holds \
             \"a/b.txt\"). A name is a file or a folder, not both: choose another name, or \
             delete \"a/b.txt\" first."
        );
        let (_, _, message) = answer(StorageError::NameConflict {
            name: "a/b.txt".into(),
            bucket: "docs".into(),
            existing: "a".into(),
        });
        assert!(
            message.contains("\"a\" is a file there, so it cannot be a folder"),
            "{message}"
        );
        let (status, code, _) = answer(StorageError::PathInUse("x/y".into()));
        assert_eq!((status, code), (StatusCode::CONFLICT, "CONFLICT"));
        // The backend's cause is logged, never answered.
        let (status, code, message) = answer(StorageError::Unavailable("disk full".into()));
        assert_eq!(
            (status, code),
            (StatusCode::SERVICE_UNAVAILABLE, "STORAGE_UNAVAILABLE")
        );
        assert!(!message.contains("disk full"));
        let (status, code, _) = answer(StorageError::Internal(anyhow::anyhow!("a bug")));
        assert_eq!(
            (status, code),
            (StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL_ERROR")
        );
    }
}
