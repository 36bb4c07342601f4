//! A MySQL project's database and accounts: created, repaired at start-up, locked while the
//! project is suspended, dropped with it.
//!
//! ```text
//!  database  fx_<id>             utf8mb4
//!  fx_<id>_read       SELECT                          on fx_<id>.*   (read scope, viewers)
//!  fx_<id>_readwrite  SELECT, INSERT, UPDATE          on fx_<id>.*   (readwrite scope)
//!  fx_<id>_admin      ALL PRIVILEGES (no GRANT OPTION) on fx_<id>.*  (admin scope, developers)
//! ```
//! Each account exists only at the host the server sees Fluxbase connect from (127.0.0.1 for
//! the embedded server), has no global privilege (so no FILE, PROCESS, SUPER, `mysql.*`, other
//! databases, `SET GLOBAL`, `KILL` of other accounts' sessions), cannot grant, and is bounded
//! to `sql_project_connections` connections (`MAX_USER_CONNECTIONS`). Passwords are derived
//! from the instance secret and never stored; every start-up sets them again, with the grants.

use anyhow::{Context, Result};
use mysql_async::prelude::Queryable;

use super::{Mysql, Target};
use crate::auth::DbRole;

/// The account of a scope: `fx_<project>_read|readwrite|admin`.
pub fn account_name(project_id: &str, role: DbRole) -> String {
    let suffix = match role {
        DbRole::Read => "read",
        DbRole::ReadWrite => "readwrite",
        DbRole::Owner => "admin",
    };
    format!("fx_{project_id}_{suffix}")
}

fn privileges(role: DbRole) -> &'static str {
    match role {
        DbRole::Read => "SELECT",
        DbRole::ReadWrite => "SELECT, INSERT, UPDATE",
        DbRole::Owner => "ALL PRIVILEGES",
    }
}

/// A database name as a grant's pattern: in `GRANT … ON db.*` an unescaped `_` or `%` is a
/// wildcard, so `fx_<id>` granted as is also gave every account of the project `fx?<id>` for any
/// character `?`: an admin key could create such databases, all three scopes used them, and
/// deleting the project left them behind (red team rt14).
fn grant_pattern(db_name: &str) -> String {
    db_name
        .replace('\\', "\\\\")
        .replace('_', "\\_")
        .replace('%', "\\%")
}

/// The databases other than `db_name` that `db_name` read as an unescaped grant pattern matches
/// (`fx?<id>`): made by the project's admin key while the grant was a wildcard. No other
/// project's database matches (ids are 16 hex digits, all in the name).
async fn strays(conn: &mut mysql_async::Conn, db_name: &str) -> Result<Vec<String>> {
    let names: Vec<String> = conn
        .exec(
            "SELECT SCHEMA_NAME FROM information_schema.SCHEMATA \
             WHERE CAST(SCHEMA_NAME AS BINARY) LIKE CAST(? AS BINARY) AND SCHEMA_NAME <> ?",
            (db_name, db_name),
        )
        .await?;
    Ok(names)
}

/// Project ids are 16 lowercase hex digits; database and account names are built from them
/// and nothing else, so they never need quoting beyond backticks.
fn check_id(project_id: &str) -> Result<()> {
    anyhow::ensure!(
        crate::auth::is_project_id(project_id),
        "not a project id: {project_id:?}"
    );
    Ok(())
}

impl Mysql {
    /// The password of a project account.
    pub fn account_password(&self, account: &str) -> String {
        self.secrets.derive(&format!("mysql-account:{account}"))
    }

    fn account(&self, target: &Target, project_id: &str, role: DbRole) -> String {
        format!(
            "'{}'@'{}'",
            account_name(project_id, role),
            target.client_host
        )
    }

    /// Creates the project's database and accounts (idempotent: also repairs them).
    pub async fn provision(&self, project_id: &str, db_name: &str) -> Result<()> {
        check_id(project_id)?;
        let target = self.server().await?;
        let mut conn = target.admin_pool.get_conn().await?;
        conn.query_drop(format!(
            "CREATE DATABASE IF NOT EXISTS `{db_name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"
        ))
        .await
        .with_context(|| format!("creating database {db_name}"))?;
        let bound = self.config.sql_project_connections;
        for role in DbRole::ALL {
            let account = self.account(target, project_id, role);
            let pw = self.account_password(&account_name(project_id, role));
            for stmt in [
                format!("CREATE USER IF NOT EXISTS {account} IDENTIFIED BY '{pw}'"),
                format!(
                    "ALTER USER {account} IDENTIFIED BY '{pw}' WITH MAX_USER_CONNECTIONS {bound}"
                ),
                // A repair starts from nothing: privileges granted by hand are taken back.
                format!("REVOKE ALL PRIVILEGES, GRANT OPTION FROM {account}"),
                format!(
                    "GRANT {} ON `{}`.* TO {account}",
                    privileges(role),
                    grant_pattern(db_name)
                ),
            ] {
                conn.query_drop(&stmt)
                    .await
                    .with_context(|| format!("provisioning {account}"))?;
            }
        }
        // Realtime broadcasts from SQL (issue 20 part B): `fluxbase_realtime_broadcast`.
        crate::cdc::binlog::provision_broadcast(
            &mut conn,
            db_name,
            &self.account(target, project_id, DbRole::Owner),
            &self.account(target, project_id, DbRole::ReadWrite),
        )
        .await
        .with_context(|| format!("provisioning the broadcast procedure of {db_name}"))?;
        // Databases the wildcard grant let the project's admin create (before the grant was
        // escaped): its accounts reach them no more; named at every start-up, dropped with the
        // project.
        // A diagnosis, like the stored programs' below: a failed listing is logged, never
        // what fails the provisioning.
        match strays(&mut conn, db_name).await {
            Ok(found) => {
                for stray in found {
                    tracing::warn!(project_id, database = %stray,
                        "a database the project's admin key created beside its own before the \
                         grant was escaped: unreachable by the project's accounts now; dropped \
                         with the project");
                }
            }
            Err(e) => tracing::warn!(project_id, error = %e,
                "listing a MySQL project's stray databases failed"),
        }
        // Stored programs made before a refusal existed (red team rt4) still run what they
        // hold when called: named at every start-up (and in `fluxbase doctor`), not dropped.
        let like = grant_pattern(db_name);
        match super::doctor::refused_in(&mut conn, &like).await {
            Ok(found) => {
                for f in found {
                    tracing::warn!(project_id, problem = %f.problem, fix = %f.fix,
                        "a stored program of a MySQL project runs SQL that requests are refused");
                }
            }
            Err(e) => tracing::warn!(project_id, error = %e,
                "reading a MySQL project's stored programs failed"),
        }
        Ok(())
    }

    /// Drops the project's accounts (ending their sessions) and database. Best effort: each
    /// failure is logged, the rest still runs; whether everything went (else the teardown
    /// sweep tries again).
    pub async fn deprovision(&self, project_id: &str, db_name: &str) -> bool {
        if check_id(project_id).is_err() {
            return false;
        }
        // No repair of its accounts runs meanwhile, or starts after (sql.rs `repair_accounts`).
        let _no_repair = self.sql.repair.lock().await;
        self.sql.mark_gone(project_id);
        self.sql.forget_project(project_id);
        let target = match self.server().await {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(project_id, error = %e, "MySQL server unreachable: project database left");
                return false;
            }
        };
        let mut conn = match target.admin_pool.get_conn().await {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(project_id, error = %e, "MySQL server unreachable: project database left");
                return false;
            }
        };
        let _ = self.kill_sessions(&mut conn, project_id).await;
        let mut stmts: Vec<String> = DbRole::ALL
            .iter()
            .map(|r| {
                format!(
                    "DROP USER IF EXISTS {}",
                    self.account(target, project_id, *r)
                )
            })
            .collect();
        stmts.push(format!("DROP DATABASE IF EXISTS `{db_name}`"));
        let mut clean = true;
        match strays(&mut conn, db_name).await {
            Ok(found) => stmts.extend(
                found
                    .into_iter()
                    .map(|d| format!("DROP DATABASE IF EXISTS `{}`", d.replace('`', "``"))),
            ),
            Err(e) => {
                clean = false;
                tracing::error!(project_id, error = %e, "listing a MySQL project's stray databases")
            }
        }
        for stmt in stmts {
            if let Err(e) = conn.query_drop(&stmt).await {
                clean = false;
                tracing::error!(project_id, error = %e, statement = %stmt, "deprovisioning a MySQL project");
            }
        }
        clean
    }

    /// Suspension: the accounts are locked and their sessions ended; resuming unlocks them.
    pub async fn set_locked(&self, project_id: &str, locked: bool) -> Result<()> {
        check_id(project_id)?;
        self.sql.forget_project(project_id);
        let target = self.server().await?;
        let mut conn = target.admin_pool.get_conn().await?;
        let verb = if locked { "LOCK" } else { "UNLOCK" };
        for role in DbRole::ALL {
            conn.query_drop(format!(
                "ALTER USER IF EXISTS {} ACCOUNT {verb}",
                self.account(target, project_id, role)
            ))
            .await?;
        }
        if locked {
            self.kill_sessions(&mut conn, project_id).await?;
        }
        Ok(())
    }

    /// Ends every session of the project's accounts.
    async fn kill_sessions(&self, conn: &mut mysql_async::Conn, project_id: &str) -> Result<()> {
        let users: Vec<String> = DbRole::ALL
            .iter()
            .map(|r| account_name(project_id, *r))
            .collect();
        let ids: Vec<u64> = conn
            .exec(
                "SELECT ID FROM information_schema.PROCESSLIST WHERE USER IN (?, ?, ?)",
                (&users[0], &users[1], &users[2]),
            )
            .await?;
        for id in ids {
            let _ = conn.query_drop(format!("KILL CONNECTION {id}")).await;
        }
        Ok(())
    }
}
