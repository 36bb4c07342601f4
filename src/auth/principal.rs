//! Who the caller is ([`Principal`]) and what they may do with one project ([`Access`]): the
//! guide's scope table (API key scopes, member roles) and the PostgreSQL role each maps to.

use crate::projects::Project;

use super::AuthError;

pub const KEY_PREFIX: &str = "flx_live_";
pub const SESSION_PREFIX: &str = "flx_sess_";

/// The scope of an API key (the guide's scope table).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Read,
    ReadWrite,
    Admin,
}

impl Scope {
    pub fn parse(s: &str) -> Option<Scope> {
        match s {
            "read" => Some(Scope::Read),
            "readwrite" => Some(Scope::ReadWrite),
            "admin" => Some(Scope::Admin),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::ReadWrite => "readwrite",
            Scope::Admin => "admin",
        }
    }
    pub fn db_role(self) -> DbRole {
        match self {
            Scope::Read => DbRole::Read,
            Scope::ReadWrite => DbRole::ReadWrite,
            Scope::Admin => DbRole::Owner,
        }
    }
}

/// A member's role in a project.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum MemberRole {
    Admin,
    Developer,
    Viewer,
}

impl MemberRole {
    pub fn parse(s: &str) -> Option<MemberRole> {
        match s {
            "admin" => Some(MemberRole::Admin),
            "developer" => Some(MemberRole::Developer),
            "viewer" => Some(MemberRole::Viewer),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            MemberRole::Admin => "admin",
            MemberRole::Developer => "developer",
            MemberRole::Viewer => "viewer",
        }
    }
    /// viewer → read; developer and admin → owner.
    pub fn db_role(self) -> DbRole {
        match self {
            MemberRole::Viewer => DbRole::Read,
            MemberRole::Developer | MemberRole::Admin => DbRole::Owner,
        }
    }
}

/// The PostgreSQL login role a caller's SQL runs as.
/// Ordered from the weakest: `Read < ReadWrite < Owner`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DbRole {
    Read,
    ReadWrite,
    Owner,
}

impl DbRole {
    pub const ALL: [DbRole; 3] = [DbRole::Owner, DbRole::ReadWrite, DbRole::Read];

    /// `fx_<project>_<suffix>`: the role's name in the cluster.
    pub fn role_name(self, project_id: &str) -> String {
        let suffix = match self {
            DbRole::Read => "read",
            DbRole::ReadWrite => "readwrite",
            DbRole::Owner => "owner",
        };
        format!("fx_{project_id}_{suffix}")
    }
}

/// The authenticated caller.
#[derive(Clone, Debug)]
pub enum Principal {
    Key {
        key_id: String,
        project_id: String,
        scope: Scope,
        /// The SHA-256 of the secret this request presented: what it authorized for longer
        /// than the request (an invitation, a realtime token) is bound to that secret, so a
        /// request that authenticated just before a rotation does not vouch for the new one
        /// (red team rt15).
        key_hash: Vec<u8>,
    },
    Session {
        user_id: String,
        token_hash: Vec<u8>,
        /// When the session expires (Unix seconds): what it authorized for longer than a
        /// request (realtime subscriptions, realtime tokens) ends then too.
        expires_at: i64,
    },
}

impl Principal {
    pub fn user_id(&self) -> Option<&str> {
        match self {
            Principal::Session { user_id, .. } => Some(user_id),
            Principal::Key { .. } => None,
        }
    }

    /// Only a user session may do this (e.g. create projects).
    pub fn require_session(&self) -> Result<&str, AuthError> {
        self.user_id().ok_or(AuthError::SessionRequired)
    }
}

/// What a principal may do with one project.
#[derive(Clone, Debug)]
pub struct Access {
    pub project: Project,
    pub db_role: DbRole,
    pub admin: bool,
    pub principal: Principal,
    pub member_role: Option<MemberRole>,
}

impl Access {
    /// Admin keys and admin members only.
    pub fn require_admin(&self) -> Result<(), AuthError> {
        if self.admin {
            return Ok(());
        }
        Err(match self.principal {
            Principal::Key { .. } => AuthError::AdminScopeRequired,
            Principal::Session { .. } => AuthError::AdminRoleRequired,
        })
    }

    /// Data and schema management (webhooks, storage deletes, RLS policies): an admin key, or a
    /// developer or admin member. `what` completes "… needs a developer or admin role".
    pub fn require_developer(&self, what: &str) -> Result<(), AuthError> {
        if self.db_role == DbRole::Owner {
            return Ok(());
        }
        Err(match self.member_role {
            Some(_) => AuthError::DeveloperRoleRequired(what.to_string()),
            None => AuthError::AdminKeyRequired(what.to_string()),
        })
    }
}

pub fn is_project_id(id: &str) -> bool {
    id.len() == 16 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}
