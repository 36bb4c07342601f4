//! Who is calling, and what they may do with a project.
//!
//! A request carries `Authorization: Bearer <token>`: an API key (`flx_live_…`, bound to one
//! project and one scope) or a user session (`flx_sess_…`, acting through the user's membership
//! role). Both are looked up by their SHA-256 hash. The resulting [`Access`] names the PostgreSQL
//! role the caller's SQL runs as; PostgreSQL's own privileges then enforce the scope table.
//!
//! ```text
//!  principal.rs     Principal, Scope, MemberRole, DbRole, Access (the scope table)
//!  authenticate.rs  Auth: bearer token → Principal (rate-limited), Principal + project → Access
//!  cache.rs         recently resolved keys and projects, valid while LISTEN is up; AccessChange
//!  ratelimit.rs     requests per caller; logins, sign-ups, password hashes, project creations
//!  error.rs         AuthError
//! ```

mod authenticate;
mod cache;
mod error;
mod principal;
pub mod ratelimit;

pub use authenticate::Auth;
pub use cache::{run_cache_listener, AccessChange, AuthCache, ListenerEvent, CACHE_CHANNEL};
pub use error::AuthError;
pub use principal::{
    is_project_id, Access, DbRole, MemberRole, Principal, Scope, KEY_PREFIX, SESSION_PREFIX,
};

/// The project an [`Access`] is for.
pub use crate::projects::Project;
