//! The change stream's state.

use serde::Serialize;

use super::reply::Json;
use super::Request;
use crate::api::error::ApiResult;
use crate::app::SharedApp;
use crate::cdc::{SlotReport, StreamStatus};

/// `/api/cdc/status`: the stream as this server runs it, the slot as PostgreSQL has it.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CdcStatus {
    pub success: bool,
    pub project_id: String,
    pub stream: StreamStatus,
    pub slot: SlotReport,
    /// MySQL projects: the oldest binary log file the stream needs beside what the server keeps
    /// and who purges it (docs/mysql.md, "Binary log retention"); absent while the MySQL
    /// server cannot be reached.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub binlog: Option<crate::mysql::retention::BinlogRetention>,
    /// Cluster mode only: which node leads the project's change stream.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<crate::app::ProjectLeadership>,
}

/// The project's change stream: state, slot, lag, last error.
#[utoipa::path(get, path = "/api/cdc/status", tag = "cdc", security(("bearer" = [])),
    params(("projectId" = String, Query, description = "The project")),
    responses((status = 200, description = "The stream and its slot", body = CdcStatus)))]
pub async fn cdc_status(app: SharedApp, req: Request) -> ApiResult<Json<CdcStatus>> {
    let access = req.access_by_query(&app).await?;
    let (id, db) = (&access.project.id, &access.project.db_name);
    let (report, binlog) = match access.project.engine {
        crate::projects::Engine::Postgresql => (app.cdc.report(id, db).await?, None),
        // The binlog stream, its stored position (src/cdc/binlog) and whether the server still
        // has the position's file.
        crate::projects::Engine::Mysql => {
            let mut report = app.cdc.report_mysql(id).await?;
            let bound = crate::mysql::retention::Bound::from_config(&app.config);
            // Without the MySQL server (down, restarting) the stream's own state still says
            // what is wrong (`reconnecting`, its last error): the object is left out.
            let binlog = match crate::mysql::retention::report(&app.mysql, &app.control, id, bound)
                .await
            {
                Ok(b) => Some(b),
                Err(e) => {
                    tracing::debug!(project_id = %id, error = %format!("{e:#}"), "reading the MySQL server's binary logs");
                    None
                }
            };
            if let crate::cdc::SlotReport::Present { wal_status, .. } = &mut report.slot {
                if binlog.as_ref().is_some_and(|b| !b.present) {
                    *wal_status = Some("lost".into());
                }
            }
            (report, binlog)
        }
    };
    Ok(Json(CdcStatus {
        success: true,
        project_id: id.clone(),
        // Never the shared log's end, nor anything that moves with another tenant's writes.
        stream: report.stream.project_view(),
        slot: report.slot,
        binlog,
        cluster: app.cluster_mode.as_ref().map(|m| m.project_report(id)),
    }))
}
