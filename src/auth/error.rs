//! Why a caller was refused: no valid credential, the wrong kind of credential or scope, a
//! project that is not theirs or not active. `crate::api::auth` maps each to the guide's
//! status and code.

use crate::auth::ratelimit::LimitError;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("API key missing or malformed. Include Authorization: Bearer <key>.")]
    MissingCredential,
    #[error("Invalid or revoked API key.")]
    InvalidKey,
    #[error("Invalid session token. Log in again.")]
    InvalidSession,
    #[error("Session token has expired. Log in again to get a new token.")]
    SessionExpired,
    #[error("This endpoint needs a user session token, not an API key.")]
    SessionRequired,
    #[error("API key does not have access to this project.")]
    KeyOfAnotherProject,
    #[error("This action needs an API key with the admin scope.")]
    AdminScopeRequired,
    #[error("Only project admins can perform this action.")]
    AdminRoleRequired,
    /// `{what} needs a developer or admin role.` (a member below developer)
    #[error("{0} needs a developer or admin role.")]
    DeveloperRoleRequired(String),
    /// `{what} needs an admin key.` (a key below admin)
    #[error("{0} needs an admin key.")]
    AdminKeyRequired(String),
    /// No such project, or one the session is no member of (not revealed to exist).
    #[error("No project found for the given projectId.")]
    ProjectNotFound,
    #[error("Project is suspended. Contact the operator or upgrade your plan.")]
    ProjectSuspended,
    #[error(transparent)]
    Limited(#[from] LimitError),
    /// The control database failed (a lost connection is told apart when mapped).
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl From<tokio_postgres::Error> for AuthError {
    fn from(e: tokio_postgres::Error) -> Self {
        AuthError::Internal(e.into())
    }
}

impl From<deadpool_postgres::PoolError> for AuthError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        AuthError::Internal(e.into())
    }
}
