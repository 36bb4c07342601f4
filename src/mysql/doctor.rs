//! `fluxbase doctor` for the operator's MySQL server (`mysql_url`): what MySQL projects and
//! their change capture need, each failure with the fix to apply.
//!
//! The embedded MariaDB is started with all of this on its command line; an operator's server
//! is checked for: row-based binlog with full images and full metadata (the change stream reads
//! column names from it), a server id, binlogs that expire, and an admin account that can
//! create databases and accounts and grant what the project and replication accounts get; that
//! no file of the server's host is reachable (`secure_file_priv`, FILE on the server's or a
//! project's account), and that project admins may define routines and triggers
//! (`log_bin_trust_function_creators`). With the control database at hand, the binary log files
//! MySQL projects still need are checked against what the server has ([`needed_logs`]), and the
//! projects' stored programs against the refusal check ([`refused_programs`]).

use mysql_async::prelude::Queryable;
use mysql_async::Opts;

use crate::doctor::Finding;

/// Global privileges the admin account needs (and must be able to grant: WITH GRANT OPTION).
const ADMIN_PRIVILEGES: &[&str] = &[
    "SELECT",
    "INSERT",
    "UPDATE",
    "DELETE",
    "CREATE",
    "DROP",
    "ALTER",
    "INDEX",
    "CREATE USER",
    "PROCESS",
    "REPLICATION SLAVE",
];

/// Checks the server at `url` (an admin account's URL); `replication_user` is this instance's
/// replication account, checked if it exists already.
pub async fn check(url: &str, replication_user: &str) -> anyhow::Result<Vec<Finding>> {
    let opts = Opts::from_url(url)
        .map_err(|e| anyhow::anyhow!("FLUXBASE_MYSQL_URL is not a valid MySQL URL: {e}"))?;
    let mut conn = match mysql_async::Conn::new(opts).await {
        Ok(c) => c,
        Err(e) => {
            return Ok(vec![Finding {
            problem: format!("cannot connect to the MySQL server of FLUXBASE_MYSQL_URL: {e}"),
            fix: "check the URL's host, port, user and password (mysql://user:password@host:3306/)"
                .into(),
        }])
        }
    };
    let mut findings = Vec::new();
    let version: String = conn
        .query_first("SELECT VERSION()")
        .await?
        .unwrap_or_default();
    let mariadb = version.to_ascii_lowercase().contains("mariadb");
    let restart = if mariadb {
        "in the server's configuration ([mariadbd] section) and restart it"
    } else {
        "in the server's configuration ([mysqld] section) and restart it"
    };
    let log_bin: Option<String> = read(&mut conn, "log_bin").await;
    if !matches!(log_bin.as_deref(), Some("1" | "ON")) {
        findings.push(Finding {
            problem: "the binary log is off (log_bin): MySQL projects have no change capture"
                .into(),
            fix: format!("set log_bin = binlog and server_id = 1 {restart}"),
        });
    }
    for (name, want) in [
        ("binlog_format", "ROW"),
        ("binlog_row_image", "FULL"),
        ("binlog_row_metadata", "FULL"),
    ] {
        match read(&mut conn, name).await {
            Some(v) if v.eq_ignore_ascii_case(want) => {}
            Some(v) => findings.push(Finding {
                problem: format!("{name} is {v}; change capture needs {want}"),
                fix: format!(
                    "SET PERSIST/GLOBAL {name} = '{want}' and set {name} = {want} {restart}"
                ),
            }),
            None => findings.push(Finding {
                problem: format!("the server has no {name} (too old: {version})"),
                fix: "use MariaDB 10.5+ or MySQL 8.0+".into(),
            }),
        }
    }
    if read(&mut conn, "server_id").await.as_deref() == Some("0") {
        findings.push(Finding {
            problem: "server_id is 0: the binary log cannot be read by a replica".into(),
            fix: format!("set server_id = 1 (any id unique among your servers) {restart}"),
        });
    }
    let expire_secs = read(&mut conn, "binlog_expire_logs_seconds")
        .await
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    let expire_days = read(&mut conn, "expire_logs_days")
        .await
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    if expire_secs == 0.0 && expire_days == 0.0 {
        findings.push(Finding {
            problem: "binary logs never expire: they fill the disk".into(),
            fix: "SET GLOBAL binlog_expire_logs_seconds = 604800; (a week) and the same in the \
                  configuration"
                .into(),
        });
    }
    // Files on the server's host: `LOAD_FILE`, `LOAD DATA INFILE` and `SELECT … INTO OUTFILE`
    // reach only `secure_file_priv` (empty, or `/`: any directory the server can read or
    // write; NULL: none).
    if let Some(dir) = read(&mut conn, "secure_file_priv")
        .await
        .filter(|dir| dir.trim_end_matches('/').is_empty())
    {
        findings.push(Finding {
            problem: format!(
                "secure_file_priv is {dir:?}: an account with FILE reads and writes any file the \
                 server can (LOAD_FILE, SELECT … INTO OUTFILE)"
            ),
            fix: format!(
                "set secure_file_priv to an empty directory the server cannot write (e.g. \
                 /var/lib/mysql-files, mode 0555) {restart}"
            ),
        });
    }
    // Project admins create routines and triggers in their own database: with the binary log
    // on, the server refuses that to accounts without SUPER unless it trusts their creators
    // (sound with a row-based log: routines are logged as the rows they change).
    if !matches!(
        read(&mut conn, "log_bin_trust_function_creators")
            .await
            .as_deref(),
        Some("1" | "ON")
    ) {
        findings.push(Finding {
            problem: "log_bin_trust_function_creators is off: a MySQL project's admin key cannot \
                      create functions, procedures or triggers in its own database"
                .into(),
            fix: format!(
                "SET GLOBAL log_bin_trust_function_creators = 1; and set \
                 log_bin_trust_function_creators = 1 {restart} (sound with binlog_format = ROW)"
            ),
        });
    }
    // MEMORY tables live in the server's RAM until dropped, sized by a session-settable
    // max_heap_table_size: a tenant's admin key must not be able to create them.
    if mariadb {
        let enforced = read(&mut conn, "enforce_storage_engine").await;
        if !enforced
            .as_deref()
            .is_some_and(|e| e.eq_ignore_ascii_case("InnoDB"))
        {
            findings.push(Finding {
                problem: format!(
                    "enforce_storage_engine is {}: a MySQL project's admin key can create \
                     ENGINE=MEMORY tables, held in the server's RAM until dropped",
                    enforced.as_deref().unwrap_or("unset")
                ),
                fix: format!(
                    "SET GLOBAL enforce_storage_engine = 'InnoDB'; and set \
                     enforce_storage_engine = InnoDB {restart}"
                ),
            });
        }
    } else {
        let disabled = read(&mut conn, "disabled_storage_engines")
            .await
            .unwrap_or_default()
            .to_ascii_uppercase();
        if !disabled.split(',').any(|e| e.trim() == "MEMORY") {
            findings.push(Finding {
                problem: "disabled_storage_engines does not list MEMORY: a MySQL project's \
                          admin key can create ENGINE=MEMORY tables, held in the server's RAM"
                    .into(),
                fix: format!("set disabled_storage_engines = \"MEMORY\" {restart}"),
            });
        }
    }
    // The admin account's own global privileges, and whether it can grant them.
    let grantee: String = conn
        .query_first(
            "SELECT CONCAT('''', SUBSTRING_INDEX(CURRENT_USER(), '@', 1), '''@''', \
             SUBSTRING_INDEX(CURRENT_USER(), '@', -1), '''')",
        )
        .await?
        .unwrap_or_default();
    let held: Vec<(String, String)> = conn
        .exec(
            "SELECT PRIVILEGE_TYPE, IS_GRANTABLE FROM information_schema.USER_PRIVILEGES \
             WHERE GRANTEE = ?",
            (&grantee,),
        )
        .await?;
    let monitor = if mariadb {
        "BINLOG MONITOR"
    } else {
        "REPLICATION CLIENT"
    };
    let mut needed: Vec<&str> = ADMIN_PRIVILEGES.to_vec();
    needed.push(monitor);
    let missing: Vec<&str> = needed
        .iter()
        .copied()
        .filter(|p| !held.iter().any(|(h, g)| h == p && g == "YES"))
        .collect();
    if !missing.is_empty() {
        findings.push(Finding {
            problem: format!(
                "the admin account {grantee} lacks (or cannot grant) {}",
                missing.join(", ")
            ),
            fix: format!(
                "GRANT ALL PRIVILEGES ON *.* TO {grantee} WITH GRANT OPTION; REVOKE FILE ON *.* \
                 FROM {grantee};"
            ),
        });
    }
    // FILE: neither the server's account nor a project account needs it (a project's accounts
    // get privileges on their own database only, which FILE is not). With it, SQL running as
    // the account (a routine a project admin defines runs as its caller) reads server files.
    let with_file: Vec<String> = conn
        .exec(
            r"SELECT GRANTEE FROM information_schema.USER_PRIVILEGES WHERE PRIVILEGE_TYPE = 'FILE'
              AND (GRANTEE = ? OR GRANTEE LIKE '''fx\_%' OR GRANTEE LIKE ?) ORDER BY GRANTEE",
            (&grantee, format!("'{replication_user}'@%")),
        )
        .await?;
    for account in with_file {
        findings.push(Finding {
            problem: format!(
                "{account} has FILE: SQL running as it can read the server's files (LOAD_FILE) \
                 and write new ones"
            ),
            fix: format!("REVOKE FILE ON *.* FROM {account};"),
        });
    }
    // The replication account, once the server has made it.
    let repl: Vec<(String, String)> = conn
        .exec(
            "SELECT GRANTEE, PRIVILEGE_TYPE FROM information_schema.USER_PRIVILEGES \
             WHERE GRANTEE LIKE CONCAT('''', ?, '''@%')",
            (replication_user,),
        )
        .await?;
    if !repl.is_empty() {
        for p in ["REPLICATION SLAVE", monitor] {
            if !repl.iter().any(|(_, h)| h == p) {
                findings.push(Finding {
                    problem: format!("the replication account {replication_user} lacks {p}"),
                    fix: format!(
                        "GRANT REPLICATION SLAVE, {monitor} ON *.* TO {}; (or restart the \
                         server: it grants them at start-up)",
                        repl[0].0
                    ),
                });
            }
        }
    }
    let _ = conn.disconnect().await;
    Ok(findings)
}

/// The binary log files MySQL projects' streams still need (`needed`: project, file of its
/// stored position) against what the server at `url` has and its expiry: a purged one is a
/// problem (that project's stream is `slot_lost`); the rest is printed (`info`).
pub async fn needed_logs(
    url: &str,
    needed: &[(String, String)],
) -> anyhow::Result<(Vec<Finding>, Option<String>)> {
    let opts = Opts::from_url(url)
        .map_err(|e| anyhow::anyhow!("FLUXBASE_MYSQL_URL is not a valid MySQL URL: {e}"))?;
    let Ok(mut conn) = mysql_async::Conn::new(opts).await else {
        // Said by check().
        return Ok((Vec::new(), None));
    };
    let logs = crate::cdc::binlog::binary_logs(&mut conn).await?;
    let expiry = super::retention::server_expiry(&mut conn).await?;
    let _ = conn.disconnect().await;
    let mut findings = Vec::new();
    for (project, file) in needed {
        if !logs.iter().any(|(f, _)| f == file) {
            findings.push(Finding {
                problem: format!(
                    "MySQL project {project}'s change stream needs binary log {file}, which the \
                     server no longer has: its stream is slot_lost (changes since are lost)"
                ),
                fix: format!(
                    "raise binlog_expire_logs_seconds (now {expiry} s) above the longest time a \
                     project's stream may be stopped; to capture from now on, delete the \
                     project's row in fluxbase.binlog_positions and restart the server"
                ),
            });
        }
    }
    let oldest_needed = needed
        .iter()
        .filter(|(_, f)| logs.iter().any(|(l, _)| l == f))
        .min_by_key(|(_, f)| crate::cdc::binlog::position::file_sequence(f));
    let info = oldest_needed.map(|(project, file)| {
        format!(
            "binary logs: MySQL projects need {file} on (project {project}); the server has {} \
             to {} and expires files after {}",
            logs.first().map_or("none", |(f, _)| f.as_str()),
            logs.last().map_or("none", |(f, _)| f.as_str()),
            if expiry == 0 {
                "never".to_string()
            } else {
                format!("{expiry} s")
            }
        )
    });
    Ok((findings, info))
}

/// A global variable as text; `None` when the server does not know it.
async fn read(conn: &mut mysql_async::Conn, name: &str) -> Option<String> {
    let value: Option<mysql_async::Value> = conn
        .query_first(format!("SELECT @@GLOBAL.{name}"))
        .await
        .ok()?;
    match value? {
        mysql_async::Value::Bytes(b) => Some(String::from_utf8_lossy(&b).into_owned()),
        mysql_async::Value::NULL => None,
        other => Some(other.as_sql(true).trim_matches('\'').to_string()),
    }
}

/// The stored programs of MySQL projects (routines, triggers, events in `fx_*` databases of
/// the server at `url`) whose body holds SQL a request is refused ([`super::sql::refused`]):
/// made before a refusal existed (red team rt4: dynamic SQL, `SET PASSWORD` in a handler),
/// they would still run it when called or fired. Each is a finding, with the `DROP` to apply.
pub async fn refused_programs(url: &str) -> anyhow::Result<Vec<Finding>> {
    let opts = Opts::from_url(url)
        .map_err(|e| anyhow::anyhow!("FLUXBASE_MYSQL_URL is not a valid MySQL URL: {e}"))?;
    let mut conn = mysql_async::Conn::new(opts).await?;
    let found = refused_in(&mut conn, "fx\\_%").await;
    let _ = conn.disconnect().await;
    found
}

/// [`refused_programs`] in the databases whose names are `LIKE schemas`.
pub(crate) async fn refused_in(
    conn: &mut mysql_async::Conn,
    schemas: &str,
) -> anyhow::Result<Vec<Finding>> {
    let programs: Vec<(String, String, String, Option<String>)> = conn
        .exec(
            "SELECT ROUTINE_SCHEMA, ROUTINE_TYPE, ROUTINE_NAME, ROUTINE_DEFINITION \
               FROM information_schema.ROUTINES WHERE ROUTINE_SCHEMA LIKE ? \
             UNION ALL SELECT TRIGGER_SCHEMA, 'TRIGGER', TRIGGER_NAME, ACTION_STATEMENT \
               FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA LIKE ? \
             UNION ALL SELECT EVENT_SCHEMA, 'EVENT', EVENT_NAME, EVENT_DEFINITION \
               FROM information_schema.EVENTS WHERE EVENT_SCHEMA LIKE ? \
             ORDER BY 1, 2, 3",
            (schemas, schemas, schemas),
        )
        .await?;
    let quote = |s: &str| format!("`{}`", s.replace('`', "``"));
    Ok(programs
        .into_iter()
        .filter_map(|(schema, kind, name, body)| {
            let why = super::sql::refused(body.as_deref().unwrap_or(""))?;
            Some(Finding {
                problem: format!(
                    "{} {}.{} runs SQL refused on MySQL projects: {why}",
                    kind.to_lowercase(),
                    schema,
                    name
                ),
                fix: format!("DROP {kind} {}.{};", quote(&schema), quote(&name)),
            })
        })
        .collect())
}
