//! SQL over HTTP.

use super::reply::{RawJson, Reply};
use super::Request;
use crate::api::error::ApiResult;
use crate::app::SharedApp;

/// Runs SQL in the project's database as the key's scope (and `authUid` for row-level
/// security).
#[utoipa::path(post, path = "/api/execute-sql", tag = "sql", security(("bearer" = [])),
    responses((status = 200, description = "`{success, result}` or a SQL error", body = Object)))]
pub async fn execute_sql(app: SharedApp, req: Request) -> ApiResult<impl Reply> {
    let principal = req.principal(&app).await?;
    let sql: crate::sql::SqlRequest = req.json()?;
    let access = app.auth.project_access(&principal, &sql.project_id).await?;
    let identity = crate::rls::request_identity(
        &access,
        sql.auth_uid.as_ref(),
        req.headers.get(crate::rls::AUTH_UID_HEADER),
    )?;
    Ok(RawJson(app.execute_sql(&access, sql, identity).await?))
}
