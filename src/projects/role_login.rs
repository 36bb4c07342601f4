//! How the server logs in as a project role ([`RoleLogin`]): the roles' passwords are expired
//! but for the moment of the server's own login, and whatever a caller changed on its role is
//! repaired first.

use std::sync::Arc;

use fluxbase_replication::wire::{ConnectConfig, Connection, WireError};

use crate::db::{quote_ident, quote_literal};
use crate::sql::PoolFailure;

/// A caller's open transaction that changed its role (`BEGIN; ALTER ROLE CURRENT_USER …;
/// SELECT pg_sleep(…)`, or one long `DO` block) holds the role's catalog row: a repair waits at
/// most this long for it, then ends that caller's session (see [`RoleLogin`]) and tries again.
const REPAIR_LOCK_TIMEOUT: &str = "SET LOCAL lock_timeout = '200ms';";

/// Repairs of one role tried in a row before its new connection is refused (429).
const REPAIR_ATTEMPTS: usize = 3;

/// How long a login waits for another process's login of the same role (advisory lock).
const LOGIN_LOCK_TIMEOUT: &str = "SET LOCAL lock_timeout = '5s';";

/// How the server logs in as a project role. PostgreSQL lets every role change its own password
/// and its own settings (`ALTER ROLE CURRENT_USER PASSWORD …`, `… SET …`, `… IN DATABASE … SET
/// …`), and no trigger sees it; it never lets a role change its own `VALID UNTIL`. So the roles'
/// passwords are expired, and each new connection of the server:
///
/// 1. as the admin role, in one statement: resets any setting stored for the role (in any
///    database) but the configured `temp_file_limit`, sets that when missing, and sets the
///    role's password (the server's own, whatever a caller set) valid for one minute;
/// 2. logs in (a `28P01` means a caller changed the password in between: again, twice at most);
/// 3. expires the password again at once.
///
/// The repairs run on the server's own small pool of admin sessions (`SqlPools::repairs`),
/// never on the control pool that serves requests, and wait at most 200 ms for the role's
/// catalog rows. The only sessions that can hold those rows are the role's own (an open
/// transaction that ran `ALTER ROLE CURRENT_USER …`): on a lock timeout those sessions are
/// terminated and the repair is tried again; after three attempts the new connection is refused
/// with 429. The three steps run in a task of their own, so a caller that goes away (a client
/// disconnecting, a pool's create timeout) never leaves step 3 undone.
///
/// Logins of one role are made one at a time, across processes too (a session-level advisory
/// lock on the repair session, `hashtext('fluxbase-login:' || role)`), so one's step 3 never
/// ends another's window. What is left: a caller who sets a password exactly inside one of
/// these few-millisecond windows could log in directly until it closes (as the same role, with
/// its privileges); a server killed between 1 and 3 leaves a window of at most a minute.
/// Sessions already open are not affected by any of this (settings apply at login), and the
/// next new connection repairs whatever a caller changed.
pub struct RoleLogin {
    repairs: deadpool_postgres::Pool,
    role: String,
    password: String,
    temp_file_limit_kb: u64,
    verifier: tokio::sync::OnceCell<String>,
    one_at_a_time: tokio::sync::Mutex<()>,
}

/// Why a repair failed.
enum RepairError {
    /// The role's catalog rows stayed locked (by its own sessions) through every attempt.
    Busy(String),
    Other(anyhow::Error),
}

impl From<RepairError> for PoolFailure {
    fn from(e: RepairError) -> Self {
        match e {
            RepairError::Busy(m) => PoolFailure::Busy(m),
            RepairError::Other(e) => PoolFailure::Wire(WireError::Protocol(format!(
                "repairing a role's login: {e:#}"
            ))),
        }
    }
}

impl RoleLogin {
    /// Logs in as `role` with `password` (the server's own), repairing on `repairs` (admin
    /// sessions) and keeping `temp_file_limit` at `temp_file_limit_kb`.
    pub fn new(
        repairs: deadpool_postgres::Pool,
        role: &str,
        password: String,
        temp_file_limit_kb: u64,
    ) -> RoleLogin {
        RoleLogin {
            repairs,
            role: role.to_string(),
            password,
            temp_file_limit_kb,
            verifier: tokio::sync::OnceCell::new(),
            one_at_a_time: tokio::sync::Mutex::new(()),
        }
    }

    /// Step 1 with `Some(verifier)`; with `None` the same resets, and the password expired.
    fn secure_sql(&self, verifier: Option<&str>) -> String {
        let role = quote_literal(&self.role);
        let wanted = quote_literal(&format!("temp_file_limit={}kB", self.temp_file_limit_kb));
        let limit = quote_literal(&format!("{}kB", self.temp_file_limit_kb));
        let valid = match verifier {
            Some(v) => format!(
                "EXECUTE format('ALTER ROLE %I PASSWORD %L VALID UNTIL %L', {role}, {}, now() + interval '1 minute');",
                quote_literal(v)
            ),
            None => format!("EXECUTE format('ALTER ROLE %I VALID UNTIL %L', {role}, '-infinity');"),
        };
        // temp_file_limit can only be set by a superuser: an admin role that is none (a managed
        // cluster) leaves it to the cluster's configuration.
        format!(
            "DO $fx$
             DECLARE
                 r oid := (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = {role});
                 wanted text[] := CASE WHEN (SELECT rolsuper FROM pg_catalog.pg_roles
                                             WHERE rolname = current_user)
                                       THEN ARRAY[{wanted}] END;
                 s record;
                 db name;
             BEGIN
                 IF r IS NULL THEN
                     RAISE EXCEPTION 'role % does not exist', {role};
                 END IF;
                 FOR s IN SELECT setdatabase, setconfig FROM pg_catalog.pg_db_role_setting
                          WHERE setrole = r LOOP
                     IF s.setdatabase <> 0 THEN
                         db := (SELECT datname FROM pg_catalog.pg_database WHERE oid = s.setdatabase);
                         IF db IS NOT NULL THEN
                             EXECUTE format('ALTER ROLE %I IN DATABASE %I RESET ALL', {role}, db);
                         END IF;
                     ELSIF s.setconfig IS DISTINCT FROM wanted THEN
                         EXECUTE format('ALTER ROLE %I RESET ALL', {role});
                     END IF;
                 END LOOP;
                 IF wanted IS NOT NULL AND NOT EXISTS (
                     SELECT 1 FROM pg_catalog.pg_db_role_setting
                     WHERE setrole = r AND setdatabase = 0 AND setconfig = wanted) THEN
                     EXECUTE format('ALTER ROLE %I SET temp_file_limit = %L', {role}, {limit});
                 END IF;
                 {valid}
             END $fx$"
        )
    }

    fn close_sql(&self) -> String {
        format!(
            "ALTER ROLE {} VALID UNTIL '-infinity'",
            quote_ident(&self.role)
        )
    }

    /// An admin session of the repair pool; 429 when all are busy for their whole wait.
    async fn session(&self) -> Result<deadpool_postgres::Object, RepairError> {
        self.repairs.get().await.map_err(|e| match e {
            deadpool_postgres::PoolError::Timeout(_) => RepairError::Busy(
                "The server's role-repair connections are all busy; retry in a moment.".into(),
            ),
            e => RepairError::Other(e.into()),
        })
    }

    /// Runs `sql` as the admin role, waiting at most 200 ms for the role's catalog rows; on a
    /// lock timeout ends the role's own sessions that hold them, then again.
    async fn repair(&self, admin: &tokio_postgres::Client, sql: &str) -> Result<(), RepairError> {
        for attempt in 1..=REPAIR_ATTEMPTS {
            let e = match admin
                .batch_execute(&format!("BEGIN; {REPAIR_LOCK_TIMEOUT} {sql}; COMMIT"))
                .await
            {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            let _ = admin.batch_execute("ROLLBACK").await;
            if e.code() != Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) {
                return Err(RepairError::Other(e.into()));
            }
            tracing::warn!(role = %self.role, attempt, "a session of the role holds its catalog row; ending it");
            self.end_lock_holders(admin).await;
        }
        Err(RepairError::Busy(format!(
            "A session of this project keeps its database role {} locked (ALTER ROLE in an open \
             transaction); retry in a moment.",
            self.role
        )))
    }

    /// Terminates the role's own sessions whose open transaction updated its catalog rows
    /// (`pg_authid`, `pg_db_role_setting`): only such a transaction holds them.
    async fn end_lock_holders(&self, admin: &tokio_postgres::Client) {
        let ended = admin
            .query(
                "SELECT pg_catalog.pg_terminate_backend(a.pid)
                 FROM pg_catalog.pg_stat_activity a
                 JOIN pg_catalog.pg_locks l ON l.pid = a.pid AND l.locktype = 'transactionid'
                      AND l.mode = 'ExclusiveLock' AND l.granted
                 WHERE a.usename = $1 AND a.pid <> pg_catalog.pg_backend_pid()
                   AND l.transactionid IN (
                       SELECT xmax FROM pg_catalog.pg_authid WHERE rolname = $1
                       UNION ALL
                       SELECT s.xmax FROM pg_catalog.pg_db_role_setting s
                       JOIN pg_catalog.pg_authid r ON r.oid = s.setrole WHERE r.rolname = $1)",
                &[&self.role],
            )
            .await;
        match ended {
            Ok(rows) => {
                tracing::warn!(role = %self.role, sessions = rows.len(), "ended sessions holding the role's catalog rows")
            }
            Err(e) => {
                tracing::warn!(role = %self.role, error = %e, "could not look for the sessions holding the role's catalog rows")
            }
        }
        // Termination is a signal: give the transaction a moment to end.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    /// The advisory lock that makes logins of one role one at a time across processes.
    fn login_lock(&self) -> String {
        format!(
            "hashtext({})",
            quote_literal(&format!("fluxbase-login:{}", self.role))
        )
    }

    /// Lets the server's password log in as the role for a moment (step 1); nothing closes it
    /// but the next login or the minute running out. For tests and tools that log in themselves.
    pub async fn open(&self) -> anyhow::Result<()> {
        let admin = self.session().await.map_err(repair_anyhow)?;
        let sql = self.secure_sql(Some(self.verifier().await));
        self.repair(&admin, &sql).await.map_err(repair_anyhow)
    }

    /// Expires the role's password again (after [`open`](Self::open)).
    pub async fn close(&self) -> anyhow::Result<()> {
        let admin = self.session().await.map_err(repair_anyhow)?;
        self.repair(&admin, &self.close_sql())
            .await
            .map_err(repair_anyhow)
    }

    /// Step 1 without opening: settings reset, password expired (start-up).
    pub async fn expire_and_repair(&self) -> anyhow::Result<()> {
        let admin = self.session().await.map_err(repair_anyhow)?;
        self.locked(&admin).await.map_err(repair_anyhow)?;
        let result = self.repair(&admin, &self.secure_sql(None)).await;
        self.unlock(admin).await;
        result.map_err(repair_anyhow)
    }

    async fn verifier(&self) -> &str {
        self.verifier
            .get_or_init(|| async {
                postgres_protocol::password::scram_sha_256(self.password.as_bytes())
            })
            .await
    }

    /// Takes the role's login lock on `admin` (waits for another process's login).
    async fn locked(&self, admin: &tokio_postgres::Client) -> Result<(), RepairError> {
        let lock = self.login_lock();
        match admin
            .batch_execute(&format!(
                "BEGIN; {LOGIN_LOCK_TIMEOUT} SELECT pg_advisory_lock({lock}); COMMIT"
            ))
            .await
        {
            Ok(()) => Ok(()),
            Err(e) => {
                let _ = admin.batch_execute("ROLLBACK").await;
                if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) {
                    Err(RepairError::Busy(format!(
                        "Another login as {} is taking long; retry in a moment.",
                        self.role
                    )))
                } else {
                    Err(RepairError::Other(e.into()))
                }
            }
        }
    }

    /// Releases the login lock; a session that cannot is closed (which releases it).
    async fn unlock(&self, admin: deadpool_postgres::Object) {
        let unlocked = admin
            .batch_execute(&format!("SELECT pg_advisory_unlock({})", self.login_lock()))
            .await;
        if unlocked.is_err() {
            drop(deadpool_postgres::Object::take(admin));
        }
    }

    /// A new connection as the role (see the type's docs); `cfg` carries the server's password.
    /// Runs in a task of its own: dropping the returned future never leaves the login open.
    pub async fn connect(self: &Arc<Self>, cfg: &ConnectConfig) -> Result<Connection, PoolFailure> {
        let this = self.clone();
        let cfg = cfg.clone();
        match tokio::spawn(async move { this.login(&cfg).await }).await {
            Ok(result) => result,
            Err(e) => Err(PoolFailure::Wire(WireError::Protocol(format!(
                "the login task failed: {e}"
            )))),
        }
    }

    async fn login(&self, cfg: &ConnectConfig) -> Result<Connection, PoolFailure> {
        let _one_at_a_time = self.one_at_a_time.lock().await;
        let admin = self.session().await?;
        self.locked(&admin).await?;
        let result = self.login_locked(&admin, cfg).await;
        self.unlock(admin).await;
        result
    }

    async fn login_locked(
        &self,
        admin: &tokio_postgres::Client,
        cfg: &ConnectConfig,
    ) -> Result<Connection, PoolFailure> {
        let open = self.secure_sql(Some(self.verifier().await));
        let close = self.close_sql();
        let mut attempt = 1;
        loop {
            self.repair(admin, &open).await?;
            let result = Connection::connect(cfg).await;
            if let Err(e) = self.repair(admin, &close).await {
                let e = match e {
                    RepairError::Busy(m) => anyhow::anyhow!(m),
                    RepairError::Other(e) => e,
                };
                tracing::warn!(role = %self.role, error = %format!("{e:#}"), "could not expire the role's password again");
            }
            match result {
                Err(WireError::Db(e)) if e.code == "28P01" && attempt < 3 => {
                    tracing::warn!(role = %self.role, "login refused (the password changed meanwhile); again");
                    attempt += 1;
                }
                other => return other.map_err(PoolFailure::Wire),
            }
        }
    }
}

fn repair_anyhow(e: RepairError) -> anyhow::Error {
    match e {
        RepairError::Busy(m) => anyhow::anyhow!(m),
        RepairError::Other(e) => e,
    }
}
