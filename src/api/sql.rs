//! SQL over HTTP.

use super::error::ApiError;
use super::reply::{json_body, Reply};
use super::Request;
use crate::api::error::ApiResult;
use crate::app::SharedApp;
use crate::auth::DbRole;
use crate::sql::{SqlError, SqlRequest, SqlResponse};
use std::sync::Arc;
use warp::reply::Response;

/// The header a trusted backend names its end user with (see [`crate::rls::identity`]).
pub const AUTH_UID_HEADER: &str = "x-fluxbase-auth-uid";

/// Runs SQL in the project's database as the key's scope (and `authUid` for row-level
/// security). A statement PostgreSQL refuses is answered with 200 and `success: false`.
#[utoipa::path(post, path = "/api/execute-sql", tag = "sql", security(("bearer" = [])),
    request_body = SqlRequest,
    params(("X-Fluxbase-Auth-Uid" = Option<String>, Header,
            description = "The end user a trusted backend acts for (as `authUid`)")),
    responses((status = 200,
        description = "`{success: true, result, executionInfo}`, or `{success: false, error}` \
                       with code `SQL_EXEC_ERROR` for a statement PostgreSQL refused",
        body = SqlResponse)))]
pub async fn execute_sql(app: SharedApp, req: Request) -> ApiResult<impl Reply> {
    let principal = req.principal(&app).await?;
    let sql: SqlRequest = req.json()?;
    if let Some((field, meant)) = sql.misspelt() {
        return Err(ApiError::BadRequest(format!(
            "unknown field `{field}`: did you mean `{meant}`?"
        )));
    }
    let mut access = app.auth.project_access(&principal, &sql.project_id).await?;
    if let Some(scope) = &sql.scope {
        access.db_role = weaker_role(access.db_role, scope)?;
    }
    if access.project.engine == crate::projects::Engine::Mysql {
        // No row-level security on MySQL: a request naming an end user is refused rather than
        // run with the key's full rights.
        if sql.auth_uid.is_some() || req.headers.contains_key(AUTH_UID_HEADER) {
            return Err(ApiError::BadRequest(
                "authUid: row-level security does not exist on MySQL projects (engine \"mysql\"); \
                 send the request without authUid"
                    .into(),
            ));
        }
        let building = building(&app, &req, &access);
        let (run_app, run_access, memory) = (app.clone(), access.clone(), building.clone());
        let text =
            super::to_completion(
                async move { run_app.mysql.execute(&run_access, &sql, memory).await },
            )
            .await?;
        let text = match text {
            Ok(text) => text,
            Err(e) => return Err(unless_deleted(&app, &access.project.id, e).await),
        };
        return answer(&app, &req, &building, text);
    }
    let identity = crate::rls::request_identity(
        &access,
        sql.auth_uid.as_ref(),
        req.headers.get(AUTH_UID_HEADER).map(|v| v.as_bytes()),
    )?;
    // Rendered by the domain straight to JSON text (no value tree per row); `SqlResponse`
    // describes those bytes for the document.
    let building = building(&app, &req, &access);
    let (run_app, run_access, memory) = (app.clone(), access.clone(), building.clone());
    let text = super::to_completion(async move {
        run_app
            .sql
            .execute(&run_access, &sql, identity.as_deref(), memory)
            .await
    })
    .await?;
    let text = match text {
        Ok(text) => text,
        Err(e) => return Err(unless_deleted(&app, &access.project.id, e).await),
    };
    answer(&app, &req, &building, text)
}

/// The request's error, or 404 `PROJECT_NOT_FOUND` when its database went away because the
/// project was deleted meanwhile (its statements are ended with it): "unreachable, retry" would
/// send the client back to a project that is gone (red team rt6 L2).
/// A deletion by another process (a node, the CLI) is announced to this server by a NOTIFY sent
/// before the drop, but heard through its own connection and tasks: the ended statement's error
/// may come first, so an unreachable database waits up to [`HEARING_A_DELETION`] for it.
async fn unless_deleted(app: &SharedApp, project_id: &str, e: SqlError) -> ApiError {
    if matches!(e, SqlError::Unavailable(_))
        && app.deletion_heard(project_id, HEARING_A_DELETION).await
    {
        return ApiError::ProjectNotFound;
    }
    e.into()
}

/// How long a statement that lost its database waits to hear of its project's deletion before
/// it answers 503 (the answer tells the client to wait 2 s before retrying anyway).
const HEARING_A_DELETION: std::time::Duration = std::time::Duration::from_millis(300);

/// The memory of the request's answer while the domain builds it: reserved in steps within
/// the answer budget and the client address's, project's and account's caps (see
/// [`crate::api::answers`]).
fn building(
    app: &SharedApp,
    req: &Request,
    access: &crate::auth::Access,
) -> Arc<crate::api::answers::Building> {
    app.answers.building(crate::api::answers::Asker {
        client: req.client,
        project: Arc::from(access.project.id.as_str()),
        account: access.project.owner.as_deref().map(Arc::from),
        may_write: access.db_role != DbRole::Read,
    })
}

/// The answer's text, built in `building`, as the response body: its reservation held until
/// the client has taken it or its send deadline passed; an answer whose build was refused a
/// step (or that does not fit) is 429 `RATE_LIMIT`, or its rows left out for a role that may
/// have written (see [`crate::api::answers`]).
fn answer(
    app: &SharedApp,
    req: &Request,
    building: &crate::api::answers::Building,
    text: String,
) -> ApiResult<Response> {
    let deadline = std::time::Duration::from_secs(app.config.sql_answer_send_timeout_secs);
    let body = app
        .answers
        .answer(
            building,
            text,
            req.send_deadline.as_ref().map(|d| (d, deadline)),
        )
        .map_err(|refused| {
            tracing::warn!(client = ?req.client, %refused, "SQL answer refused");
            ApiError::Busy(refused.to_string())
        })?;
    Ok(json_body(body))
}

/// The role of the requested `scope`, refused if it is stronger than the caller's own.
fn weaker_role(own: DbRole, scope: &serde_json::Value) -> Result<DbRole, ApiError> {
    let wanted = match scope.as_str() {
        Some("read") => DbRole::Read,
        Some("readwrite") => DbRole::ReadWrite,
        Some("admin") => DbRole::Owner,
        _ => {
            return Err(ApiError::BadRequest(
                "scope: expected \"read\", \"readwrite\" or \"admin\"".into(),
            ))
        }
    };
    if wanted > own {
        return Err(ApiError::ScopeMismatch(format!(
            "scope {scope} is stronger than this caller's own; a request may only run with a \
             weaker one"
        )));
    }
    Ok(wanted)
}

impl From<SqlError> for ApiError {
    fn from(e: SqlError) -> Self {
        match e {
            SqlError::Busy(m) => ApiError::Busy(m),
            SqlError::Unavailable(cause) => ApiError::DatabaseUnavailable(cause),
            SqlError::Login(m) => {
                ApiError::Internal(anyhow::anyhow!("project role login failed: {m}"))
            }
            SqlError::Control(e) => ApiError::from(e),
        }
    }
}
