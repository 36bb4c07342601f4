//! What can go wrong with buckets, files and objects, by what the caller should do next: fix the
//! request (invalid names, types, limits, forms), look elsewhere (not found), retry later (a
//! conflict with another upload or delete, an unavailable backend), or nothing (an internal
//! failure). The messages are the API's; the HTTP layer maps each variant to the guide's status
//! and code (`impl From<StorageError> for ApiError` in `src/api/storage.rs`).

/// A storage failure.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    // The request is invalid.
    #[error(
        "name: bucket names are 1–63 characters of lowercase letters, digits, hyphens and \
         underscores (got {0:?})"
    )]
    InvalidBucketName(String),
    #[error("path: invalid file name {name:?}: {why}")]
    InvalidObjectName { name: String, why: String },
    #[error("path: names a folder, but the file part has no filename")]
    FolderWithoutFilename,
    #[error("file: the file part has no filename; send one or a `path` field")]
    NoFilename,
    #[error("file: invalid content type {0:?}")]
    InvalidContentType(String),
    #[error("maxFileSize: expected a positive number of bytes")]
    InvalidMaxFileSize,
    #[error("allowedMimeTypes: {0:?} is not a MIME type or pattern like image/*")]
    InvalidMimePattern(String),
    #[error(
        "file: content type {content_type:?} is not allowed in bucket {bucket:?} (allowed: {})",
        allowed.join(", ")
    )]
    TypeNotAllowed {
        content_type: String,
        bucket: String,
        allowed: Vec<String>,
    },
    #[error("fileId: expected a UUID")]
    InvalidFileId,
    #[error("s3Key: missing (or give fileId)")]
    NoFileNamed,
    #[error("Content-Type: expected multipart/form-data with a boundary")]
    NotMultipart,
    #[error("invalid multipart body: {0}")]
    InvalidMultipart(super::multipart::Error),
    #[error("{0}: expected true or false")]
    NotABoolean(&'static str),
    #[error("{0}: unknown form field (expected file, bucketId, projectId, path, upsert)")]
    UnknownField(String),
    #[error("{field}: longer than {limit} bytes")]
    FieldTooLong { field: String, limit: usize },
    #[error("{0}: not UTF-8")]
    FieldNotUtf8(String),
    #[error("file: send exactly one file per request")]
    SeveralFiles,
    #[error("file: missing file part")]
    NoFile,
    #[error("{0}: missing form field")]
    MissingField(&'static str),
    /// No byte of the body arrived for `body_idle_timeout_secs`.
    #[error("{0}")]
    BodyStalled(crate::error::BodyStalled),
    /// The file, or the whole body, is larger than the limit (bytes).
    #[error("larger than the limit of {0} bytes")]
    TooLarge(u64),

    // Nothing there.
    #[error("No bucket {0:?} in this project.")]
    NoSuchBucket(String),
    /// The bucket was deleted while a file was being uploaded into it.
    #[error("Bucket {0:?} was deleted.")]
    BucketDeleted(String),
    #[error("No file with s3Key {0:?}.")]
    NoSuchKey(String),
    #[error("No file {0:?} in this project.")]
    NoSuchFile(String),
    /// A download of a file that is not there (or not for this URL): one answer for all, so a
    /// public URL does not reveal private files.
    #[error("File not found.")]
    NotServed,

    // In use or taken: retry, or choose another name.
    #[error("A bucket named {0:?} already exists in this project.")]
    BucketExists(String),
    #[error("Bucket {name:?} is not empty: it holds {files} file(s). Delete its files first.")]
    BucketNotEmpty { name: String, files: i64 },
    #[error(
        "A file named {name:?} already exists in bucket {bucket:?}. Send upsert=true to replace it."
    )]
    FileExists { name: String, bucket: String },
    /// A name that would be a file and a folder at once: `existing` is a file that `name` would
    /// be inside, or a name inside `name` (retrying changes nothing until one of them goes).
    #[error("{}", name_conflict(name, bucket, existing))]
    NameConflict {
        name: String,
        bucket: String,
        existing: String,
    },
    /// The local disk holds a file where `name` needs a folder, or a folder where it needs a
    /// file, that no row lists ([`super::backend`]'s `placing_error`).
    #[error(
        "Cannot store {0:?}: the storage holds a file where it needs a folder, or a folder where \
         it needs a file. A name is a file or a folder, not both: choose another name."
    )]
    PathInUse(String),
    #[error("An upload of this file is in progress; retry when it is done.")]
    UploadInProgress,
    #[error("Another upload or a delete of {0:?} is in progress; retry when it is done.")]
    FileBusy(String),

    // A URL that grants nothing.
    #[error("The URL's signature is not valid.")]
    InvalidSignature,
    #[error("The URL has expired.")]
    UrlExpired,

    /// The backend (disk or S3) failed; the operation changed nothing. The cause is logged,
    /// never answered.
    #[error("storage backend: {0}")]
    Unavailable(String),
    /// The control database or a bug.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

fn name_conflict(name: &str, bucket: &str, existing: &str) -> String {
    let clash = if name.starts_with(&format!("{existing}/")) {
        format!("{existing:?} is a file there, so it cannot be a folder")
    } else {
        format!("{name:?} is a folder there (it holds {existing:?})")
    };
    format!(
        "Cannot store {name:?} in bucket {bucket:?}: {clash}. A name is a file or a folder, \
         not both: choose another name, or delete {existing:?} first."
    )
}

impl From<tokio_postgres::Error> for StorageError {
    fn from(e: tokio_postgres::Error) -> Self {
        StorageError::Internal(e.into())
    }
}

impl From<deadpool_postgres::PoolError> for StorageError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        StorageError::Internal(e.into())
    }
}

impl From<object_store::Error> for StorageError {
    fn from(e: object_store::Error) -> Self {
        StorageError::Unavailable(e.to_string())
    }
}

impl From<tokio::task::JoinError> for StorageError {
    fn from(e: tokio::task::JoinError) -> Self {
        StorageError::Internal(e.into())
    }
}
