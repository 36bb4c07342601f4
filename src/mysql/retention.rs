//! Binary log retention: which binlog files MySQL projects' change streams still need, and, on
//! the embedded MariaDB, purging the rest.
//!
//! ```text
//!  control db: binlog_positions (every MySQL project, running or not) ─► oldest needed file
//!  server: SHOW BINARY LOGS (+ each file's age, embedded: its mtime)  ─► the bound's oldest file
//!                  purge to max(needed, bound)  ─► PURGE BINARY LOGS TO '<file>'
//! ```
//!
//! * **Embedded server**: its own expiry is off (`binlog_expire_logs_seconds=0`); Fluxbase
//!   purges every `mysql_binlog_purge_interval_secs` (60 s) up to the oldest file a project's
//!   stored position is in: a stopped or lagging stream (a suspended project, a server down for
//!   days) finds its position again. Bounded like PostgreSQL's `max_slot_wal_keep_size`: the
//!   files kept total at most `mysql_binlog_retain_bytes` (8 GB) and none is older than
//!   `mysql_binlog_retain_secs` (a week); past either, the oldest go anyway, and a project whose
//!   position was in them reports `slot_lost` (its stream stops at its next check, within 5 s
//!   when running; `/api/cdc/status` says `walStatus: lost`): changes were lost, never silently
//!   skipped. The file being written is never purged, and the server itself keeps any file a
//!   running dump still reads.
//! * **An operator's server** (`mysql_url`): its expiry is the operator's. `/api/cdc/status`
//!   and `fluxbase doctor` report the oldest file a project needs beside the server's expiry.

use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use mysql_async::prelude::Queryable;

use crate::cdc::binlog::position::file_sequence;

/// What a purge keeps at most.
#[derive(Clone, Copy, Debug)]
pub struct Bound {
    pub bytes: u64,
    pub age: Duration,
}

/// A binary log file: its name, size, and when it was last written (`None`: unknown).
#[derive(Clone, Debug)]
pub struct LogFile {
    pub name: String,
    pub size: u64,
    pub modified: Option<SystemTime>,
}

impl Bound {
    pub fn from_config(config: &crate::config::Config) -> Bound {
        Bound {
            bytes: config.mysql_binlog_retain_bytes,
            age: Duration::from_secs(config.mysql_binlog_retain_secs),
        }
    }
}

/// What one purge does: the first file it keeps (`None`: nothing to purge), and the projects
/// whose stored position is in a file it removes (their changes since are lost).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub purge_to: Option<String>,
    pub lost: Vec<String>,
}

/// Decides a purge. `logs`: the server's files, oldest first (the last is being written);
/// `needed`: (project, file of its stored position).
pub fn plan(logs: &[LogFile], needed: &[(String, String)], now: SystemTime, bound: Bound) -> Plan {
    let Some(current) = logs.last() else {
        return Plan::default();
    };
    let seq = |name: &str| file_sequence(name).unwrap_or(0);
    // The oldest file any project needs; the current file when none needs an older one.
    let needed_seq = needed
        .iter()
        .map(|(_, f)| seq(f))
        .min()
        .unwrap_or(u32::MAX)
        .min(seq(&current.name));
    // The oldest file the bound keeps: from the newest back, while the total fits and the file
    // is young enough (the current file always stays).
    let mut kept_from = logs.len() - 1;
    let mut total = current.size;
    for i in (0..logs.len() - 1).rev() {
        let f = &logs[i];
        total = total.saturating_add(f.size);
        let too_old = f
            .modified
            .and_then(|m| now.duration_since(m).ok())
            .is_some_and(|age| age > bound.age);
        if total > bound.bytes || too_old {
            break;
        }
        kept_from = i;
    }
    // Keep from the needed file, unless the bound says a later one.
    let keep_seq = needed_seq.max(seq(&logs[kept_from].name));
    let Some(first_kept) = logs.iter().find(|f| seq(&f.name) >= keep_seq) else {
        return Plan::default();
    };
    if seq(&first_kept.name) <= seq(&logs[0].name) {
        return Plan::default();
    }
    let mut lost: Vec<String> = needed
        .iter()
        .filter(|(_, f)| seq(f) < keep_seq)
        .map(|(p, _)| p.clone())
        .collect();
    lost.sort();
    Plan {
        purge_to: Some(first_kept.name.clone()),
        lost,
    }
}

/// (project, file) of every MySQL project's stored position.
pub async fn needed(client: &impl tokio_postgres::GenericClient) -> Result<Vec<(String, String)>> {
    Ok(client
        .query(
            "SELECT b.project_id, b.binlog_file FROM fluxbase.binlog_positions b
             JOIN fluxbase.projects p ON p.id = b.project_id WHERE p.engine = 'mysql'",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// The server's binary log files; their ages from `dir` (the embedded server's data directory,
/// where they are), unknown without it.
pub async fn log_files(
    conn: &mut mysql_async::Conn,
    dir: Option<&std::path::Path>,
) -> Result<Vec<LogFile>> {
    let logs = crate::cdc::binlog::binary_logs(conn).await?;
    Ok(logs
        .into_iter()
        .map(|(name, size)| LogFile {
            modified: dir.and_then(|d| std::fs::metadata(d.join(&name)).ok()?.modified().ok()),
            name,
            size,
        })
        .collect())
}

/// One purge of the embedded server's binary logs (see the module docs).
pub async fn purge(
    mysql: &super::Mysql,
    control: &deadpool_postgres::Pool,
    bound: Bound,
) -> Result<Plan> {
    let Some(server) = mysql.embedded() else {
        return Ok(Plan::default());
    };
    let target = mysql.server().await?;
    let mut conn = target.admin_pool.get_conn().await?;
    // The files and the positions are read, and the purge made, under the lock a new project's
    // first position is recorded under: that position is either seen here or read after.
    let mut client = control.get().await?;
    let tx = client.transaction().await?;
    crate::cdc::binlog::position::lock(&*tx).await?;
    let logs = log_files(&mut conn, Some(&server.data_dir())).await?;
    let needed = needed(&*tx).await?;
    let plan = plan(&logs, &needed, SystemTime::now(), bound);
    if let Some(to) = &plan.purge_to {
        if !plan.lost.is_empty() {
            tracing::error!(
                projects = ?plan.lost,
                purge_to = %to,
                retain_bytes = bound.bytes,
                retain_secs = bound.age.as_secs(),
                "binary logs past mysql_binlog_retain_bytes/_secs purged though MySQL projects' \
                 change streams still needed them: their changes since are lost (slot_lost)"
            );
        }
        // The name comes from the server's own list (no quote in it).
        conn.query_drop(format!("PURGE BINARY LOGS TO '{}'", to.replace('\'', "")))
            .await
            .with_context(|| format!("PURGE BINARY LOGS TO '{to}'"))?;
        tracing::info!(purge_to = %to, "purged the embedded MariaDB's binary logs");
        mysql.binlog_facts.invalidate().await;
    }
    tx.commit().await?;
    Ok(plan)
}

/// What `/api/cdc/status` and `fluxbase doctor` say of a MySQL project's binary log.
#[derive(Clone, Debug, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BinlogRetention {
    /// The file of the project's stored position: the oldest its stream needs.
    pub needed_file: Option<String>,
    /// The oldest file the server has.
    pub oldest_file: Option<String>,
    /// Whether the server still has the needed file (false: `slot_lost`).
    pub present: bool,
    /// Who purges: `fluxbase` (the embedded server, bounded by `retainBytes`/`retainSecs`) or
    /// `server` (an operator's server, by its own expiry).
    pub purged_by: &'static str,
    pub retain_bytes: Option<u64>,
    pub retain_secs: Option<u64>,
    /// The server's expiry in seconds (`binlog_expire_logs_seconds`, or `expire_logs_days`
    /// × 86,400); 0: never. An operator's server only.
    pub server_expire_secs: Option<u64>,
}

/// What `/api/cdc/status` reads of the MySQL server for every MySQL project: its binary logs
/// and (an operator's server) its expiry.
#[derive(Debug)]
pub struct ServerFacts {
    pub logs: Vec<(String, u64)>,
    pub expire_secs: Option<u64>,
}

/// How long `/api/cdc/status` reuses what it read of the server.
pub const FACTS_TTL: Duration = Duration::from_secs(1);

/// How long `/api/cdc/status` waits for an admin connection and the server's answers before it
/// leaves the `binlog` object out.
pub const FACTS_TIMEOUT: Duration = Duration::from_secs(5);

/// The server facts shared by every `/api/cdc/status` call: read through one admin connection
/// at a time (the admin pool has 4, needed by project creation, provisioning and purges) and
/// at most once per [`FACTS_TTL`]; concurrent callers wait for that one read. A failed read
/// is reused for the TTL too: callers queued behind an unreachable server fail at once rather
/// than each waiting out [`FACTS_TIMEOUT`] in turn.
type Read = std::result::Result<std::sync::Arc<ServerFacts>, String>;

#[derive(Default)]
pub struct FactsCache(tokio::sync::Mutex<Option<(std::time::Instant, Read)>>);

impl FactsCache {
    pub async fn get(&self, mysql: &super::Mysql) -> Result<std::sync::Arc<ServerFacts>> {
        let mut cached = self.0.lock().await;
        if let Some((at, read)) = cached.as_ref() {
            if at.elapsed() < FACTS_TTL {
                return read.clone().map_err(anyhow::Error::msg);
            }
        }
        let read = async {
            let target = mysql.server().await?;
            let mut conn = target.admin_pool.get_conn().await?;
            let logs = crate::cdc::binlog::binary_logs(&mut conn).await?;
            let expire_secs = if mysql.embedded().is_some() {
                None
            } else {
                Some(server_expiry(&mut conn).await?)
            };
            anyhow::Ok(ServerFacts { logs, expire_secs })
        };
        let read: Read = match tokio::time::timeout(FACTS_TIMEOUT, read).await {
            Ok(Ok(facts)) => Ok(std::sync::Arc::new(facts)),
            Ok(Err(e)) => Err(format!("{e:#}")),
            Err(_) => Err(format!(
                "the MySQL server did not answer in {FACTS_TIMEOUT:?}"
            )),
        };
        *cached = Some((std::time::Instant::now(), read.clone()));
        read.map_err(anyhow::Error::msg)
    }

    /// Forgets what was read (this server just purged: the next status reads the list again).
    pub async fn invalidate(&self) {
        *self.0.lock().await = None;
    }
}

/// A MySQL project's binary log as the server has it (for `/api/cdc/status`; the server's
/// side is at most [`FACTS_TTL`] old).
pub async fn report(
    mysql: &super::Mysql,
    control: &deadpool_postgres::Pool,
    project_id: &str,
    bound: Bound,
) -> Result<BinlogRetention> {
    let stored = {
        let client = control.get().await?;
        crate::cdc::binlog::position::load(&**client, project_id).await?
    };
    let facts = mysql.binlog_facts.get(mysql).await?;
    let logs = &facts.logs;
    let needed_file = stored.map(|s| s.position.file);
    let present = needed_file
        .as_ref()
        .is_some_and(|f| logs.iter().any(|(name, _)| name == f));
    let embedded = mysql.embedded().is_some();
    Ok(BinlogRetention {
        needed_file,
        oldest_file: logs.first().map(|(name, _)| name.clone()),
        present,
        purged_by: if embedded { "fluxbase" } else { "server" },
        retain_bytes: embedded.then_some(bound.bytes),
        retain_secs: embedded.then_some(bound.age.as_secs()),
        server_expire_secs: facts.expire_secs,
    })
}

/// The server's binary log expiry in seconds (0: never).
pub async fn server_expiry(conn: &mut mysql_async::Conn) -> Result<u64> {
    let secs: Option<f64> = conn
        .query_first("SELECT @@GLOBAL.binlog_expire_logs_seconds")
        .await
        .ok()
        .flatten();
    let days: Option<f64> = conn
        .query_first("SELECT @@GLOBAL.expire_logs_days")
        .await
        .ok()
        .flatten();
    Ok(match (secs, days) {
        (Some(s), _) if s > 0.0 => s as u64,
        (_, Some(d)) if d > 0.0 => (d * 86_400.0) as u64,
        _ => 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logs(sizes: &[(u32, u64, u64)], now: SystemTime) -> Vec<LogFile> {
        sizes
            .iter()
            .map(|(n, size, age)| LogFile {
                name: format!("binlog.{n:06}"),
                size: *size,
                modified: Some(now - Duration::from_secs(*age)),
            })
            .collect()
    }

    fn need(p: &str, n: u32) -> (String, String) {
        (p.to_string(), format!("binlog.{n:06}"))
    }

    const WIDE: Bound = Bound {
        bytes: u64::MAX,
        age: Duration::from_secs(1 << 40),
    };

    #[test]
    fn files_are_purged_up_to_the_oldest_one_a_project_needs() {
        let now = SystemTime::now();
        let l = logs(&[(1, 100, 50), (2, 100, 40), (3, 100, 30), (4, 10, 0)], now);
        let p = plan(&l, &[need("a", 3), need("b", 2)], now, WIDE);
        assert_eq!(p.purge_to.as_deref(), Some("binlog.000002"));
        assert!(p.lost.is_empty());
        // Nothing needed: everything but the current file.
        let p = plan(&l, &[], now, WIDE);
        assert_eq!(p.purge_to.as_deref(), Some("binlog.000004"));
        // The oldest file needed: nothing to do.
        assert_eq!(plan(&l, &[need("a", 1)], now, WIDE), Plan::default());
        // A position past the log's end (a reset server) keeps the current file only.
        let p = plan(&l, &[need("a", 9)], now, WIDE);
        assert_eq!(p.purge_to.as_deref(), Some("binlog.000004"));
        assert_eq!(plan(&[], &[need("a", 1)], now, WIDE), Plan::default());
    }

    #[test]
    fn past_the_bound_the_oldest_files_go_and_their_projects_are_lost() {
        let now = SystemTime::now();
        let l = logs(&[(1, 100, 50), (2, 100, 40), (3, 100, 30), (4, 10, 0)], now);
        // 200 bytes: files 3 and 4 (110 bytes; with file 2, 210).
        let by_size = Bound {
            bytes: 200,
            age: WIDE.age,
        };
        let p = plan(
            &l,
            &[need("a", 1), need("b", 3), need("c", 2)],
            now,
            by_size,
        );
        assert_eq!(p.purge_to.as_deref(), Some("binlog.000003"));
        assert_eq!(p.lost, vec!["a".to_string(), "c".to_string()]);
        // Exactly 210 bytes keeps file 2 as well ("at most").
        let exact = Bound {
            bytes: 210,
            age: WIDE.age,
        };
        let p = plan(&l, &[need("a", 1), need("c", 2)], now, exact);
        assert_eq!(p.purge_to.as_deref(), Some("binlog.000002"));
        assert_eq!(p.lost, vec!["a".to_string()]);
        // 35 s: files younger than that (3, 4).
        let by_age = Bound {
            bytes: u64::MAX,
            age: Duration::from_secs(35),
        };
        let p = plan(&l, &[need("a", 2)], now, by_age);
        assert_eq!(p.purge_to.as_deref(), Some("binlog.000003"));
        assert_eq!(p.lost, vec!["a".to_string()]);
        // The current file stays whatever its size.
        let tiny = Bound {
            bytes: 1,
            age: WIDE.age,
        };
        let p = plan(&l, &[need("a", 4)], now, tiny);
        assert_eq!(p.purge_to.as_deref(), Some("binlog.000004"));
        assert!(p.lost.is_empty());
        // Unknown ages count as young.
        let mut unknown = l.clone();
        for f in &mut unknown {
            f.modified = None;
        }
        assert_eq!(
            plan(&unknown, &[need("a", 1)], now, by_age),
            Plan::default()
        );
    }

    /// One tenant's stalled stream (its position far back) against the others': what it can
    /// cost them is disk up to the bound, never their positions. Purging is by prefix (the
    /// oldest files first), so past the bound the stalled stream is the first lost; a stream
    /// that lags less keeps its file as long as its own distance to the log's end is within
    /// the bound, however long the stalled one has held the log.
    #[test]
    fn a_stalled_tenant_is_lost_alone_and_never_takes_a_less_lagging_one_with_it() {
        let now = SystemTime::now();
        // Ten files of 100 bytes, the last being written; a bound of 500 bytes.
        let files: Vec<(u32, u64, u64)> = (1..=10).map(|n| (n, 100, 100 - n as u64)).collect();
        let l = logs(&files, now);
        let bound = Bound {
            bytes: 500,
            age: WIDE.age,
        };
        // "stalled" stopped in file 2; "slow" lags into file 6 (its own 500 bytes); the rest
        // follow the log's end.
        let needed = [
            need("stalled", 2),
            need("slow", 6),
            need("idle", 10),
            need("busy", 9),
        ];
        let p = plan(&l, &needed, now, bound);
        assert_eq!(p.purge_to.as_deref(), Some("binlog.000006"));
        assert_eq!(p.lost, vec!["stalled".to_string()]);
        let kept: u64 = l.iter().skip(5).map(|f| f.size).sum();
        assert!(kept <= bound.bytes, "{kept}");
        // Without the stalled tenant the others keep exactly the same files: it did not bring
        // them any closer to losing theirs.
        let p2 = plan(&l, &needed[1..], now, bound);
        assert_eq!(p2.purge_to, p.purge_to);
        assert!(p2.lost.is_empty());
        // Within the bound the stalled tenant holds the log for itself (the disk it costs)
        // and the others lose nothing.
        let p3 = plan(&l, &[need("stalled", 6), need("busy", 9)], now, bound);
        assert_eq!(p3.purge_to.as_deref(), Some("binlog.000006"));
        assert!(p3.lost.is_empty());
    }
}
