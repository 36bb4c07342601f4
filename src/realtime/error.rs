//! Why realtime refused something. A subscribe sends the refusal to its socket as an `error`
//! message (`code` from [`RealtimeError::code`], `message` from its text); the REST endpoints
//! (tokens, broadcasts) map it to the guide's HTTP status in `crate::api::realtime`.

/// A refusal or failure of the realtime service.
#[derive(Debug, thiserror::Error)]
pub enum RealtimeError {
    /// A malformed message or request field (`BAD_MESSAGE` on a socket, 400 over HTTP).
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    AuthRequired(String),
    /// A realtime token past its expiry.
    #[error("Realtime token has expired.")]
    TokenExpired,
    #[error("{0}")]
    ScopeMismatch(String),
    #[error("{0}")]
    InsufficientPermissions(String),
    /// The key or membership a subscription (or token) was authorized by is gone.
    #[error("{0}")]
    AccessRevoked(String),
    #[error("{0}")]
    ProjectNotFound(String),
    #[error("Project is suspended. Contact the operator or upgrade your plan.")]
    ProjectSuspended,
    /// A bound on rooms per socket, sockets per room or identities per room.
    #[error("{0}")]
    LimitExceeded(String),
    /// A broadcast payload over `realtime_max_broadcast_bytes`.
    #[error("broadcast payload is {size} bytes; the limit is {limit} bytes")]
    PayloadTooLarge { size: usize, limit: usize },
    /// A broadcast from the REST API over the project's budget (or, rarely, out of ids at its
    /// position for this boot): the bounds are named in the HTTP answer.
    #[error("over the project's broadcast budget")]
    Busy { per_sec: u32, bytes_per_sec: usize },
    /// Cluster mode: the broadcast could not reach the project's leader or its stream (NATS
    /// down, a failover under way).
    #[error("Realtime is unavailable right now ({0}). Retry after a few seconds.")]
    Unavailable(String),
    /// Refused by another part of the server (authentication, the API's rate limit, SQL
    /// connections), with the guide's code and message it gave.
    #[error("{message}")]
    Refused { code: &'static str, message: String },
    /// A failure of the control database or a bug: its text never reaches a client.
    #[error("{}", if is_outage(.0) { OUTAGE } else { "Unexpected server error." })]
    Internal(anyhow::Error),
}

const OUTAGE: &str = "The database is unreachable. Retry after a few seconds.";

fn is_outage(e: &anyhow::Error) -> bool {
    e.chain().any(crate::error::is_connection_error)
}

impl RealtimeError {
    /// The code of an `error` message on a socket (the guide's codes).
    pub fn code(&self) -> &'static str {
        use RealtimeError::*;
        match self {
            BadRequest(_) => "BAD_MESSAGE",
            AuthRequired(_) => "AUTH_REQUIRED",
            TokenExpired => "TOKEN_EXPIRED",
            ScopeMismatch(_) => "SCOPE_MISMATCH",
            InsufficientPermissions(_) => "INSUFFICIENT_PERMISSIONS",
            AccessRevoked(_) => "ACCESS_REVOKED",
            ProjectNotFound(_) => "PROJECT_NOT_FOUND",
            ProjectSuspended => "PROJECT_SUSPENDED",
            LimitExceeded(_) => "LIMIT_EXCEEDED",
            PayloadTooLarge { .. } => "PAYLOAD_TOO_LARGE",
            Busy { .. } => "RATE_LIMIT",
            Unavailable(_) => "REALTIME_UNAVAILABLE",
            Refused { code, .. } => code,
            Internal(e) if is_outage(e) => "DATABASE_CONNECTION_ERROR",
            Internal(_) => "INTERNAL_ERROR",
        }
    }
}

impl From<anyhow::Error> for RealtimeError {
    fn from(e: anyhow::Error) -> Self {
        RealtimeError::Internal(e)
    }
}

impl From<tokio_postgres::Error> for RealtimeError {
    fn from(e: tokio_postgres::Error) -> Self {
        RealtimeError::Internal(e.into())
    }
}

impl From<deadpool_postgres::PoolError> for RealtimeError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        RealtimeError::Internal(e.into())
    }
}
