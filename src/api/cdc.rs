//! The change stream's state.

use serde_json::json;
use warp::http::StatusCode;

use super::reply::Reply;
use super::Request;
use crate::api::error::ApiResult;
use crate::app::SharedApp;

/// The project's change stream: state, slot, lag, last error.
#[utoipa::path(get, path = "/api/cdc/status", tag = "cdc", security(("bearer" = [])),
    params(("projectId" = String, Query, description = "The project")),
    responses((status = 200, description = "`{success, stream}`", body = Object)))]
pub async fn cdc_status(app: SharedApp, req: Request) -> ApiResult<impl Reply> {
    let access = req.access_by_query(&app).await?;
    let (id, db) = (&access.project.id, &access.project.db_name);
    let report = app.cdc.report(id, db).await?;
    Ok((
        StatusCode::OK,
        json!({ "success": true, "projectId": id, "stream": report.stream, "slot": report.slot }),
    ))
}
