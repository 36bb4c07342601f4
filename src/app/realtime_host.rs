//! What realtime asks of the rest of the server ([`crate::realtime::Host`]), answered by the
//! services that own it; their refusals pass on as the guide's code and message.

use futures_util::future::BoxFuture;

use super::App;
use crate::api::error::ApiError;
use crate::realtime::RealtimeError;

/// What realtime asks of the rest of the server, answered by the services that own it.
impl crate::realtime::Host for App {
    fn load_project<'a>(
        &'a self,
        project_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<crate::auth::Project>, RealtimeError>> {
        Box::pin(async move {
            self.auth
                .load_project(project_id)
                .await
                .map_err(|e| refused(e.into()))
        })
    }

    fn authenticate<'a>(
        &'a self,
        token: &'a str,
    ) -> BoxFuture<'a, Result<crate::auth::Principal, RealtimeError>> {
        Box::pin(async move {
            self.auth
                .authenticate(Some(&format!("Bearer {token}")))
                .await
                .map_err(|e| refused(e.into()))
        })
    }

    fn project_access<'a>(
        &'a self,
        principal: &'a crate::auth::Principal,
        project_id: &'a str,
    ) -> BoxFuture<'a, Result<crate::auth::Access, RealtimeError>> {
        Box::pin(async move {
            self.auth
                .project_access(principal, project_id)
                .await
                .map_err(|e| refused(e.into()))
        })
    }

    fn request_identity(
        &self,
        access: &crate::auth::Access,
        auth_uid: &serde_json::Value,
    ) -> Result<Option<String>, RealtimeError> {
        crate::rls::request_identity(access, Some(auth_uid), None).map_err(|e| match e {
            crate::rls::RlsError::Invalid(m) => RealtimeError::BadRequest(m),
            other => refused(other.into()),
        })
    }

    fn rate_check(&self, caller: &str) -> Result<(), RealtimeError> {
        self.rate.check(caller).map_err(|e| refused(e.into()))
    }

    fn connect<'a>(
        &'a self,
        database: &'a str,
    ) -> BoxFuture<'a, anyhow::Result<tokio_postgres::Client>> {
        Box::pin(self.cluster.connect(database))
    }

    fn sql_connection<'a>(
        &'a self,
        project: &'a crate::auth::Project,
        role: crate::auth::DbRole,
    ) -> BoxFuture<'a, Result<crate::sql::Checkout, RealtimeError>> {
        Box::pin(async move {
            self.sql
                .connection(project, role)
                .await
                .map_err(|e| refused(e.into()))
        })
    }

    fn identity_key(&self, project_id: &str) -> [u8; 32] {
        self.sql.identities().key(project_id)
    }

    fn install_identity_key<'a>(
        &'a self,
        project: &'a crate::auth::Project,
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(self.sql.identities().install_key(project))
    }

    fn stream_delayed(&self, project_id: &str) -> Option<String> {
        self.cdc.delayed(project_id)
    }

    fn binlog_end(
        &self,
    ) -> BoxFuture<'_, Result<fluxbase_replication::pgoutput::Lsn, RealtimeError>> {
        Box::pin(async move {
            let read = async {
                use crate::cdc::binlog::{current_position, position};
                let mut conn = self.mysql.server().await?.admin_pool.get_conn().await?;
                let end = current_position(&mut conn)
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                Ok::<_, anyhow::Error>(position::to_lsn(&end.file, end.offset)?)
            };
            read.await.map_err(RealtimeError::Internal)
        })
    }
}

/// Another service's refusal, as realtime passes it on: the guide's code and message.
fn refused(e: ApiError) -> RealtimeError {
    RealtimeError::Refused {
        code: e.code(),
        message: e.to_string(),
    }
}
