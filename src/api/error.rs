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
    /// A request PostgreSQL refused for what it asked (a policy naming a missing column):
    /// `details` carries the SQLSTATE as `"ERROR:  42703"`, as SQL errors do.
    #[error("{message}")]
    Refused { message: String, sqlstate: String },
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
    /// No byte of the request body arrived for this many seconds (`body_idle_timeout_secs`).
    #[error("No byte of the request body arrived for {0} s (body_idle_timeout_secs); the request was abandoned.")]
    BodyStalled(u64),
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
    #[error("The database is unreachable. Retry after a few seconds.")]
    DatabaseUnavailable(String),
    /// Cluster mode: the project's leader or the cluster's stream (NATS) could not be reached.
    #[error("{0}")]
    RealtimeUnavailable(String),
    /// The storage backend (disk or S3) failed; the operation changed nothing.
    #[error("The storage backend is unavailable. Retry after a few seconds.")]
    StorageUnavailable(String),
    /// A download's `Range` has no byte within the file of this many bytes (answered with
    /// `Content-Range: bytes */<size>`, RFC 9110 §15.5.17).
    #[error("Range: no byte of the range is within the file's {0} bytes.")]
    RangeNotSatisfiable(u64),
    /// A download's `If-Match` or `If-Unmodified-Since` named another version of the file.
    #[error("If-Match / If-Unmodified-Since: the file is not that version any more.")]
    PreconditionFailed,
    /// The path exists with other methods: those (the `Allow` header, RFC 9110 §15.5.6).
    #[error("Method not allowed.")]
    MethodNotAllowed(String),
    /// Built from an `anyhow::Error` with `?`, unless the error is a lost or refused database
    /// connection: that is a [`ApiError::DatabaseUnavailable`] (see [`crate::error::is_connection_error`]).
    #[error("Unexpected server error.")]
    Internal(anyhow::Error),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        use ApiError::*;
        match self {
            BadRequest(_) | Refused { .. } => StatusCode::BAD_REQUEST,
            AuthRequired(_) | TokenExpired => StatusCode::UNAUTHORIZED,
            ScopeMismatch(_) | ProjectSuspended | InsufficientPermissions(_) | AccessDenied(_) => {
                StatusCode::FORBIDDEN
            }
            ProjectNotFound | UserNotFound(_) | NotFound(_) => StatusCode::NOT_FOUND,
            Conflict(_) => StatusCode::CONFLICT,
            PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            BodyStalled(_) => StatusCode::REQUEST_TIMEOUT,
            RateLimited { .. } | Busy(_) => StatusCode::TOO_MANY_REQUESTS,
            DatabaseUnavailable(_) | StorageUnavailable(_) | RealtimeUnavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            RangeNotSatisfiable(_) => StatusCode::RANGE_NOT_SATISFIABLE,
            PreconditionFailed => StatusCode::PRECONDITION_FAILED,
            Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        use ApiError::*;
        match self {
            BadRequest(_) | Refused { .. } => "BAD_REQUEST",
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
            BodyStalled(_) => "REQUEST_TIMEOUT",
            RateLimited { .. } | Busy(_) => "RATE_LIMIT",
            DatabaseUnavailable(_) => "DATABASE_CONNECTION_ERROR",
            StorageUnavailable(_) => "STORAGE_UNAVAILABLE",
            RealtimeUnavailable(_) => "REALTIME_UNAVAILABLE",
            MethodNotAllowed(_) => "METHOD_NOT_ALLOWED",
            RangeNotSatisfiable(_) => "RANGE_NOT_SATISFIABLE",
            PreconditionFailed => "PRECONDITION_FAILED",
            Internal(_) => "INTERNAL_ERROR",
        }
    }

    /// The JSON body. Internal, database and storage failures are logged with the request's id
    /// (`request_id`, or a fresh one outside a request) and answer with that id only.
    pub fn body(&self, request_id: Option<&str>) -> Value {
        let mut error = json!({ "code": self.code(), "message": self.to_string() });
        let request_id = || {
            request_id
                .map(str::to_string)
                .unwrap_or_else(crate::api::fresh_request_id)
        };
        match self {
            ApiError::Refused { sqlstate, .. } => {
                error["details"] = json!(format!("ERROR:  {sqlstate}"));
            }
            ApiError::Internal(e) => {
                let request_id = request_id();
                tracing::error!(request_id, error = %format!("{e:#}"), "internal error");
                error["details"] = json!({ "requestId": request_id });
            }
            ApiError::DatabaseUnavailable(cause) => {
                let request_id = request_id();
                tracing::warn!(request_id, cause, "database unreachable");
                error["details"] = json!({ "requestId": request_id });
            }
            ApiError::StorageUnavailable(cause) => {
                let request_id = request_id();
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
            ApiError::DatabaseUnavailable(_)
            | ApiError::StorageUnavailable(_)
            | ApiError::RealtimeUnavailable(_) => Some(2),
            _ => None,
        }
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        if e.chain().any(crate::error::is_connection_error) {
            ApiError::DatabaseUnavailable(format!("{e:#}"))
        } else if e.chain().any(is_unstorable_text) {
            ApiError::BadRequest(
                "A text value contains a character PostgreSQL cannot store (NUL, U+0000).".into(),
            )
        } else {
            ApiError::Internal(e)
        }
    }
}

impl From<tokio_postgres::Error> for ApiError {
    fn from(e: tokio_postgres::Error) -> Self {
        anyhow::Error::from(e).into()
    }
}

impl From<deadpool_postgres::PoolError> for ApiError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        anyhow::Error::from(e).into()
    }
}

/// A value from the request that PostgreSQL refused to store as text: a NUL character
/// (`invalid byte sequence for encoding "UTF8": 0x00`, 22021) or one the encoding lacks (22P05).
/// The client's input, not a fault of the server: a 400, wherever the value was bound.
fn is_unstorable_text(e: &(dyn std::error::Error + 'static)) -> bool {
    e.downcast_ref::<tokio_postgres::Error>()
        .and_then(tokio_postgres::Error::as_db_error)
        .is_some_and(|db| matches!(db.code().code(), "22021" | "22P05"))
}

pub type ApiResult<T> = Result<T, ApiError>;

#[cfg(test)]
mod tests {
    use super::*;
    use warp::http::StatusCode;

    #[tokio::test]
    async fn a_refused_database_connection_is_a_503_and_other_errors_stay_500() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let refused = tokio_postgres::connect(
            &format!("host=127.0.0.1 port={port} user=nobody"),
            tokio_postgres::NoTls,
        )
        .await
        .err()
        .expect("nothing listens there");
        let e = ApiError::from(refused);
        assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(e.code(), "DATABASE_CONNECTION_ERROR");
        // Through anyhow with context, as the admin connections report it.
        let refused = tokio_postgres::connect(
            &format!("host=127.0.0.1 port={port} user=nobody"),
            tokio_postgres::NoTls,
        )
        .await
        .err()
        .unwrap();
        let e = ApiError::from(anyhow::Error::from(refused).context("connecting"));
        assert_eq!(e.code(), "DATABASE_CONNECTION_ERROR");
        let e = ApiError::from(anyhow::anyhow!("a bug"));
        assert_eq!(e.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[test]
    fn a_connection_sqlstate_in_an_error_from_a_live_connection_is_no_outage() {
        use fluxbase_replication::wire::{DbError, Phase, WireError};
        let db = |severity: &str| {
            WireError::Db(Box::new(DbError {
                severity: severity.into(),
                code: "08006".into(),
                message: "x".into(),
                detail: None,
                hint: None,
                position: None,
                internal_position: None,
                internal_query: None,
                where_: None,
                schema: None,
                table: None,
                column: None,
                datatype: None,
                constraint: None,
                phase: Phase::Query,
            }))
        };
        let e = ApiError::from(anyhow::Error::from(db("ERROR")));
        assert_eq!(e.code(), "INTERNAL_ERROR");
        let e = ApiError::from(anyhow::Error::from(db("FATAL")));
        assert_eq!(e.code(), "DATABASE_CONNECTION_ERROR");
    }
}
