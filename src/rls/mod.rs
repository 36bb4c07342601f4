//! Row-level security: the request's identity as `auth.uid()`, which no SQL sent through the API
//! can change, and the policy API (`/api/rls/policies`), the guide's dashboard steps as endpoints.
//!
//! One job per file:
//! - [`identity`]: who a request acts for, and setting it on a pooled connection (`auth.uid()`);
//! - [`expression`]: the lexer that checks a policy expression and wraps its `auth.uid()` calls;
//! - [`policies`]: list, create, toggle and delete policies in the project's catalog.
//!
//! Realtime applies the same policies to row changes: [`crate::visibility`].

pub mod expression;
pub mod identity;
pub mod policies;

use fluxbase_replication::wire::WireError;

pub use identity::{
    auth_role, identity_tag, padded_keys, request_identity, valid_uid, Identities, KnownIdentity,
    KEY_MISSING,
};
pub use policies::Policies;

/// Why a policy request or a request's identity was refused.
#[derive(Debug, thiserror::Error)]
pub enum RlsError {
    /// A field is missing or invalid (named first in the message), or PostgreSQL refused the
    /// policy (an unknown column, a type mismatch).
    #[error("{0}")]
    Invalid(String),
    /// PostgreSQL refused the policy's statement for what it says (an unknown column, a type
    /// mismatch): the message and the SQLSTATE.
    #[error("{message}")]
    Refused { message: String, sqlstate: String },
    /// A member's session named another user than itself.
    #[error("{0}")]
    ForeignIdentity(String),
    /// No such table or policy.
    #[error("{0}")]
    NotFound(String),
    /// A policy of that name exists on the table.
    #[error("{0}")]
    Exists(String),
    /// PostgreSQL refused the owner role the change (`42501`).
    #[error("{0}")]
    PermissionDenied(String),
    /// The project's database was lost mid-request.
    #[error("the project database is unreachable: {0}")]
    Connection(#[from] WireError),
    /// No connection to the project's database.
    #[error(transparent)]
    Sql(#[from] crate::sql::SqlError),
}
