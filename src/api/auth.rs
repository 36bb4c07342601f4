//! Accounts: sign-up, login, logout and the session's own account.

use super::reply::Reply;
use super::Request;
use crate::api::error::ApiResult;
use crate::app::SharedApp;

/// Creates an account and returns a session token.
#[utoipa::path(post, path = "/api/auth/signup", tag = "auth",
    responses((status = 201, description = "The account and a session token", body = Object)))]
pub async fn signup(app: SharedApp, req: Request) -> ApiResult<impl Reply> {
    app.signup(req.json()?, req.client).await
}

/// Exchanges email and password for a session token.
#[utoipa::path(post, path = "/api/auth/login", tag = "auth",
    responses((status = 200, description = "A session token", body = Object)))]
pub async fn login(app: SharedApp, req: Request) -> ApiResult<impl Reply> {
    app.login(req.json()?, req.client).await
}

/// Ends the session of the token used.
#[utoipa::path(post, path = "/api/auth/logout", tag = "auth", security(("bearer" = [])),
    responses((status = 200, description = "`{success: true}`", body = Object)))]
pub async fn logout(app: SharedApp, req: Request) -> ApiResult<impl Reply> {
    let principal = req.principal(&app).await?;
    app.logout(&principal).await
}

/// The account behind the session token.
#[utoipa::path(get, path = "/api/auth/me", tag = "auth", security(("bearer" = [])),
    responses((status = 200, description = "The account", body = Object)))]
pub async fn me(app: SharedApp, req: Request) -> ApiResult<impl Reply> {
    let principal = req.principal(&app).await?;
    app.me(&principal).await
}
