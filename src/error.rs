//! The API's error type: every failure a request can meet, mapped in one place to the guide's
//! HTTP status, machine-readable code and the body shape
//! `{"success": false, "error": {"code", "message", "details"?}}`.
//!
//! Internal errors are logged with a request id and answered with that id only: no internals
//! reach the client.

use serde_json::{json, Value};
use warp::http::StatusCode;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    AuthRequired(String),
    #[error("Session token has expired. Log in again to get a new token.")]
    TokenExpired,
    #[error("{0}")]
    ScopeMismatch(String),
    #[error("Project is suspended. Contact the operator or upgrade your plan.")]
    ProjectSuspended,
    #[error("{0}")]
    InsufficientPermissions(String),
    /// A signed or public URL that does not (or no longer) grant access.
    #[error("{0}")]
    AccessDenied(String),
    #[error("No project found for the given projectId.")]
    ProjectNotFound,
    #[error("{0}")]
    UserNotFound(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("Request body is larger than the limit of {0} bytes.")]
    PayloadTooLarge(usize),
    #[error("Too many requests: {limit} per {window_secs} seconds. Retry after {retry_after} s.")]
    RateLimited {
        limit: u32,
        window_secs: u64,
        retry_after: u64,
    },
    /// A bounded resource (a project's SQL share, the password hashers) stayed busy for the
    /// whole bounded wait: 429 `RATE_LIMIT`, the message names the limit.
    #[error("{0}")]
    Busy(String),
    #[error("The project database is unreachable. Retry after a few seconds.")]
    DatabaseUnavailable(String),
    /// The storage backend (disk or S3) failed; the operation changed nothing.
    #[error("The storage backend is unavailable. Retry after a few seconds.")]
    StorageUnavailable(String),
    #[error("Method not allowed.")]
    MethodNotAllowed,
    #[error("Unexpected server error.")]
    Internal(#[from] anyhow::Error),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        use ApiError::*;
        match self {
            BadRequest(_) => StatusCode::BAD_REQUEST,
            AuthRequired(_) | TokenExpired => StatusCode::UNAUTHORIZED,
            ScopeMismatch(_) | ProjectSuspended | InsufficientPermissions(_) | AccessDenied(_) => {
                StatusCode::FORBIDDEN
            }
            ProjectNotFound | UserNotFound(_) | NotFound(_) => StatusCode::NOT_FOUND,
            Conflict(_) => StatusCode::CONFLICT,
            PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            RateLimited { .. } | Busy(_) => StatusCode::TOO_MANY_REQUESTS,
            DatabaseUnavailable(_) | StorageUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        use ApiError::*;
        match self {
            BadRequest(_) => "BAD_REQUEST",
            AuthRequired(_) => "AUTH_REQUIRED",
            TokenExpired => "TOKEN_EXPIRED",
            ScopeMismatch(_) => "SCOPE_MISMATCH",
            ProjectSuspended => "PROJECT_SUSPENDED",
            InsufficientPermissions(_) => "INSUFFICIENT_PERMISSIONS",
            AccessDenied(_) => "ACCESS_DENIED",
            ProjectNotFound => "PROJECT_NOT_FOUND",
            UserNotFound(_) => "USER_NOT_FOUND",
            NotFound(_) => "NOT_FOUND",
            Conflict(_) => "CONFLICT",
            PayloadTooLarge(_) => "PAYLOAD_TOO_LARGE",
            RateLimited { .. } | Busy(_) => "RATE_LIMIT",
            DatabaseUnavailable(_) => "DATABASE_CONNECTION_ERROR",
            StorageUnavailable(_) => "STORAGE_UNAVAILABLE",
            MethodNotAllowed => "METHOD_NOT_ALLOWED",
            Internal(_) => "INTERNAL_ERROR",
        }
    }

    /// The JSON body; logs internal and database errors with a fresh request id.
    pub fn body(&self) -> Value {
        let mut error = json!({ "code": self.code(), "message": self.to_string() });
        match self {
            ApiError::Internal(e) => {
                let request_id = crate::secrets::random_hex::<8>();
                tracing::error!(request_id, error = ?e, "internal error");
                error["details"] = json!({ "requestId": request_id });
            }
            ApiError::DatabaseUnavailable(cause) => {
                let request_id = crate::secrets::random_hex::<8>();
                tracing::warn!(request_id, cause, "project database unreachable");
                error["details"] = json!({ "requestId": request_id });
            }
            ApiError::StorageUnavailable(cause) => {
                let request_id = crate::secrets::random_hex::<8>();
                tracing::warn!(request_id, cause, "storage backend failed");
                error["details"] = json!({ "requestId": request_id });
            }
            _ => {}
        }
        json!({ "success": false, "error": error })
    }

    /// Seconds for a `Retry-After` header, when the client should wait.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            ApiError::RateLimited { retry_after, .. } => Some(*retry_after),
            ApiError::Busy(_) => Some(1),
            ApiError::DatabaseUnavailable(_) | ApiError::StorageUnavailable(_) => Some(2),
            _ => None,
        }
    }
}

impl From<tokio_postgres::Error> for ApiError {
    fn from(e: tokio_postgres::Error) -> Self {
        ApiError::Internal(e.into())
    }
}

impl From<deadpool_postgres::PoolError> for ApiError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        ApiError::Internal(e.into())
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
