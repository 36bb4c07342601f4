//! Storage: buckets, files, signed and public downloads.

use warp::reply::Response;

use super::reply::Reply;
use super::Request;
use crate::api::error::ApiResult;
use crate::app::SharedApp;

/// The project's buckets.
#[utoipa::path(get, path = "/api/storage/buckets", tag = "storage", security(("bearer" = [])),
    params(("projectId" = String, Query, description = "The project")),
    responses((status = 200, description = "`{success, buckets}`", body = Object)))]
pub async fn list_buckets(app: SharedApp, req: Request) -> ApiResult<impl Reply> {
    let access = req.access_by_query(&app).await?;
    app.list_buckets(&access).await
}

/// Creates a bucket.
#[utoipa::path(post, path = "/api/storage/buckets", tag = "storage", security(("bearer" = [])),
    responses((status = 201, description = "`{success, bucket}`", body = Object)))]
pub async fn create_bucket(app: SharedApp, req: Request) -> ApiResult<impl Reply> {
    let access = req.access_by_body(&app).await?;
    app.create_bucket(&access, req.json()?).await
}

/// Renames a bucket or changes its visibility and limits.
#[utoipa::path(patch, path = "/api/storage/buckets", tag = "storage", security(("bearer" = [])),
    responses((status = 200, description = "`{success, bucket}`", body = Object)))]
pub async fn patch_bucket(app: SharedApp, req: Request) -> ApiResult<impl Reply> {
    let access = req.access_by_body(&app).await?;
    app.patch_bucket(&access, req.json()?).await
}

/// Deletes an empty bucket.
#[utoipa::path(delete, path = "/api/storage/buckets", tag = "storage", security(("bearer" = [])),
    params(("projectId" = String, Query, description = "The project"),
           ("bucketId" = String, Query, description = "The bucket")),
    responses((status = 200, description = "`{success: true}`", body = Object)))]
pub async fn delete_bucket(app: SharedApp, req: Request) -> ApiResult<impl Reply> {
    let access = req.access_by_query(&app).await?;
    app.delete_bucket(&access, req.param("bucketId")?).await
}

/// Uploads a file (multipart form: `file`, with `projectId` and `bucketId` in the query or the
/// form); the body streams to the backend.
#[utoipa::path(post, path = "/api/storage/upload", tag = "storage", security(("bearer" = [])),
    responses((status = 201, description = "`{success, file}`", body = Object)))]
pub async fn upload_file(app: SharedApp, mut req: Request) -> ApiResult<impl Reply> {
    let body = req.take_stream();
    app.upload(&req.headers, &req.query, body).await
}

/// The files of a bucket.
#[utoipa::path(get, path = "/api/storage/files", tag = "storage", security(("bearer" = [])),
    params(("projectId" = String, Query, description = "The project"),
           ("bucketId" = String, Query, description = "The bucket")),
    responses((status = 200, description = "`{success, files}`", body = Object)))]
pub async fn list_files(app: SharedApp, req: Request) -> ApiResult<impl Reply> {
    let access = req.access_by_query(&app).await?;
    let base = crate::storage::base_url(&app.config, &req.headers);
    app.list_files(&access, req.param("bucketId")?, &base).await
}

/// A signed download URL for a file.
#[utoipa::path(get, path = "/api/storage/url", tag = "storage", security(("bearer" = [])),
    params(("projectId" = String, Query, description = "The project"),
           ("s3Key" = String, Query, description = "The file's key")),
    responses((status = 200, description = "`{success, url, expiresAt}`", body = Object)))]
pub async fn signed_url(app: SharedApp, req: Request) -> ApiResult<impl Reply> {
    let access = req.access_by_query(&app).await?;
    let base = crate::storage::base_url(&app.config, &req.headers);
    app.signed_url(&access, req.param("s3Key")?, &base).await
}

/// Deletes a file, named by `fileId` or `s3Key` (query string or JSON body).
#[utoipa::path(delete, path = "/api/storage/files", tag = "storage", security(("bearer" = [])),
    params(("projectId" = Option<String>, Query, description = "The project"),
           ("fileId" = Option<String>, Query, description = "The file's id"),
           ("s3Key" = Option<String>, Query, description = "The file's key")),
    responses((status = 200, description = "`{success: true}`", body = Object)))]
pub async fn delete_file(app: SharedApp, req: Request) -> ApiResult<impl Reply> {
    delete(app, req).await
}

/// The guide's spelling of [`delete_file`].
#[utoipa::path(delete, path = "/api/storage/delete", tag = "storage", security(("bearer" = [])),
    params(("projectId" = Option<String>, Query, description = "The project"),
           ("fileId" = Option<String>, Query, description = "The file's id"),
           ("s3Key" = Option<String>, Query, description = "The file's key")),
    responses((status = 200, description = "`{success: true}`", body = Object)))]
pub async fn delete_file_legacy(app: SharedApp, req: Request) -> ApiResult<impl Reply> {
    delete(app, req).await
}

async fn delete(app: SharedApp, req: Request) -> ApiResult<impl Reply> {
    let principal = req.principal(&app).await?;
    let target = DeleteFile::from_request(&req)?;
    let access = app
        .auth
        .project_access(&principal, &target.project_id)
        .await?;
    app.delete_file(&access, target.file_id.as_deref(), target.s3_key.as_deref())
        .await
}

/// The file to delete: `?projectId=&s3Key=` or `?projectId=&fileId=`, or the same fields in
/// a JSON body.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct DeleteFile {
    project_id: String,
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
#[utoipa::path(method(get, head), path = "/api/storage/object", tag = "storage",
    params(("key" = String, Query, description = "The file's key"),
           ("expires" = String, Query, description = "Unix seconds"),
           ("signature" = String, Query, description = "HMAC of key and expiry")),
    responses((status = 200, description = "The file's bytes", content_type = "application/octet-stream")))]
pub async fn signed_download(app: SharedApp, req: Request) -> ApiResult<Response> {
    app.signed_download(
        req.param("key")?,
        req.param("expires")?,
        req.param("signature")?,
        req.method == warp::http::Method::HEAD,
    )
    .await
}

/// A file of a public bucket, at `/api/storage/public/<projectId>/<bucket>/<path>`.
#[utoipa::path(method(get, head), path = "/api/storage/public/{path}", tag = "storage",
    params(("path" = String, Path, description = "`<projectId>/<bucket>/<file path>`, percent-encoded")),
    responses((status = 200, description = "The file's bytes", content_type = "application/octet-stream")))]
pub async fn public_download(app: SharedApp, req: Request) -> ApiResult<Response> {
    app.public_download(&req.tail, req.method == warp::http::Method::HEAD)
        .await
}
