//! Accounts: sign-up, login, logout and the session's own account. Also where the errors of
//! authentication, accounts and the account limits meet the guide's codes.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::error::{ApiError, ApiResult};
use super::reply::{Created, Json};
use super::Request;
use crate::accounts::{AccountsError, Membership, NewUser, Session, User};
use crate::app::SharedApp;
use crate::auth::ratelimit::LimitError;
use crate::auth::{AccessChange, AuthError};
use crate::team::PendingInvite;

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SignupRequest {
    pub email: String,
    pub password: String,
    pub display_name: Option<String>,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoginRequest {
    pub email: String,
    pub password: String,
}

/// `{success: true}`: the action is done and there is nothing more to tell.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Done {
    pub success: bool,
}

impl Done {
    pub fn reply() -> Json<Done> {
        Json(Done { success: true })
    }
}

/// A session just opened, with its account.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionReply {
    pub success: bool,
    pub user: User,
    pub token: String,
    #[schema(value_type = String, format = DateTime)]
    pub expires_at: DateTime<Utc>,
}

impl From<Session> for SessionReply {
    fn from(s: Session) -> Self {
        SessionReply {
            success: true,
            user: s.user,
            token: s.token,
            expires_at: s.expires_at,
        }
    }
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct MeReply {
    pub success: bool,
    pub user: User,
    /// The projects the account belongs to, oldest first.
    pub projects: Vec<Membership>,
    /// Invitations awaiting the account's answer.
    pub invites: Vec<PendingInvite>,
}

/// Creates an account and returns a session token.
#[utoipa::path(post, path = "/api/auth/signup", tag = "auth", request_body = SignupRequest,
    responses((status = 201, description = "The account and a session token", body = SessionReply)))]
pub async fn signup(app: SharedApp, req: Request) -> ApiResult<Created<SessionReply>> {
    let body: SignupRequest = req.json()?;
    let new = NewUser {
        email: body.email,
        password: body.password,
        display_name: body.display_name,
    };
    Ok(Created(app.accounts.signup(new, req.client).await?.into()))
}

/// Exchanges email and password for a session token.
#[utoipa::path(post, path = "/api/auth/login", tag = "auth", request_body = LoginRequest,
    responses((status = 200, description = "A session token", body = SessionReply)))]
pub async fn login(app: SharedApp, req: Request) -> ApiResult<Json<SessionReply>> {
    let body: LoginRequest = req.json()?;
    let session = app
        .accounts
        .login(&body.email, body.password, req.client)
        .await?;
    Ok(Json(session.into()))
}

/// Ends the session of the token used.
#[utoipa::path(post, path = "/api/auth/logout", tag = "auth", security(("bearer" = [])),
    responses((status = 200, description = "The session is ended", body = Done)))]
pub async fn logout(app: SharedApp, req: Request) -> ApiResult<Json<Done>> {
    let principal = req.principal(&app).await?;
    app.accounts.logout(&principal).await?;
    // The realtime subscriptions it opened (directly or through tokens it obtained) end here
    // and, through NOTIFY, on every server; its tokens are refused from now on.
    if let crate::auth::Principal::Session {
        user_id,
        token_hash,
        ..
    } = &principal
    {
        let session = app.realtime.session_fingerprint(token_hash);
        app.realtime.end_sessions(user_id, Some(&session));
        app.auth
            .notify_access_change(&AccessChange::SessionsEnded {
                user_id: user_id.clone(),
                session: Some(session),
            })
            .await;
    }
    Ok(Done::reply())
}

/// The account behind the session token.
#[utoipa::path(get, path = "/api/auth/me", tag = "auth", security(("bearer" = [])),
    responses((status = 200, description = "The account", body = MeReply)))]
pub async fn me(app: SharedApp, req: Request) -> ApiResult<Json<MeReply>> {
    let principal = req.principal(&app).await?;
    let me = app.accounts.me(&principal).await?;
    Ok(Json(MeReply {
        success: true,
        user: me.user,
        projects: me.projects,
        invites: me.invites,
    }))
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        use AuthError::*;
        match e {
            MissingCredential | InvalidKey | InvalidSession => {
                ApiError::AuthRequired(e.to_string())
            }
            SessionExpired => ApiError::TokenExpired,
            SessionRequired | KeyOfAnotherProject | AdminScopeRequired | AdminKeyRequired(_) => {
                ApiError::ScopeMismatch(e.to_string())
            }
            AdminRoleRequired | DeveloperRoleRequired(_) => {
                ApiError::InsufficientPermissions(e.to_string())
            }
            ProjectNotFound => ApiError::ProjectNotFound,
            ProjectSuspended => ApiError::ProjectSuspended,
            Limited(e) => e.into(),
            Internal(e) => e.into(),
        }
    }
}

impl From<LimitError> for ApiError {
    fn from(e: LimitError) -> Self {
        match e {
            LimitError::RateLimited {
                limit,
                window_secs,
                retry_after,
            } => ApiError::RateLimited {
                limit,
                window_secs,
                retry_after,
            },
            LimitError::HashersBusy(_) => ApiError::Busy(e.to_string()),
            LimitError::HashersGone | LimitError::HashPanicked => {
                ApiError::Internal(anyhow::Error::from(e))
            }
        }
    }
}

impl From<AccountsError> for ApiError {
    fn from(e: AccountsError) -> Self {
        use AccountsError::*;
        match e {
            Auth(e) => e.into(),
            LogoutNeedsSession => ApiError::ScopeMismatch(e.to_string()),
            EmailTooLong(_) | InvalidEmail(_) | InvalidPassword | DisplayNameTooLong => {
                ApiError::BadRequest(e.to_string())
            }
            EmailTaken => ApiError::Conflict(e.to_string()),
            WrongCredentials => ApiError::AuthRequired(e.to_string()),
            NoSuchUser(_) => ApiError::UserNotFound(e.to_string()),
            AmbiguousEmail(_) => ApiError::Conflict(e.to_string()),
            Limited(e) => e.into(),
            Internal(e) => e.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::KeysError;
    use crate::projects::ProjectsError;
    use crate::team::TeamError;

    fn shape(e: impl Into<ApiError>) -> (u16, &'static str, String) {
        let e = e.into();
        (e.status().as_u16(), e.code(), e.to_string())
    }

    #[test]
    fn domain_errors_keep_the_guides_status_code_and_message() {
        assert_eq!(
            shape(AuthError::MissingCredential),
            (
                401,
                "AUTH_REQUIRED",
                "API key missing or malformed. Include Authorization: Bearer <key>.".into()
            )
        );
        assert_eq!(shape(AuthError::SessionExpired).1, "TOKEN_EXPIRED");
        assert_eq!(
            shape(AuthError::AdminKeyRequired("Managing webhooks".into())),
            (
                403,
                "SCOPE_MISMATCH",
                "Managing webhooks needs an admin key.".into()
            )
        );
        assert_eq!(
            shape(AuthError::DeveloperRoleRequired("Deleting files".into())),
            (
                403,
                "INSUFFICIENT_PERMISSIONS",
                "Deleting files needs a developer or admin role.".into()
            )
        );
        assert_eq!(shape(AuthError::ProjectSuspended).1, "PROJECT_SUSPENDED");
        let limited = shape(LimitError::RateLimited {
            limit: 3,
            window_secs: 10,
            retry_after: 7,
        });
        assert_eq!((limited.0, limited.1), (429, "RATE_LIMIT"));
        assert_eq!(shape(LimitError::HashersBusy(2)).0, 429);
        assert_eq!(shape(LimitError::HashPanicked).0, 500);
        assert_eq!(
            shape(AccountsError::EmailTaken),
            (
                409,
                "CONFLICT",
                "An account with this email already exists.".into()
            )
        );
        assert_eq!(shape(AccountsError::WrongCredentials).1, "AUTH_REQUIRED");
        assert_eq!(
            shape(KeysError::NoSuchKey("key_x".into())),
            (
                404,
                "NOT_FOUND",
                "keyId: no key \"key_x\" in this project".into()
            )
        );
        assert_eq!(
            shape(ProjectsError::NoSuchProject("0123456789abcdef".into())).1,
            "PROJECT_NOT_FOUND"
        );
        assert_eq!(shape(ProjectsError::QuotaReached(3)).0, 403);
        assert_eq!(shape(TeamError::LastAdmin).0, 409);
        assert_eq!(shape(TeamError::LastOwner).0, 409);
        assert_eq!(
            shape(TeamError::QuotaReached(3)).1,
            "INSUFFICIENT_PERMISSIONS"
        );
        assert_eq!(
            shape(TeamError::NoSuchAccount("a@b.co".into())),
            (
                404,
                "USER_NOT_FOUND",
                "email: \"a@b.co\" does not match any registered Fluxbase account.".into()
            )
        );
        // A cause never reaches the client: an internal error says only that it happened.
        let internal = shape(KeysError::Internal(anyhow::anyhow!("secret detail")));
        assert_eq!(
            (internal.0, internal.2.as_str()),
            (500, "Unexpected server error.")
        );
    }
}
