//! A request's SQL on a checked-out connection: the identity first, then the statement(s),
//! under the server's own guard against a statement that outlives its budget.
//!
//! Without `params` the text goes through the simple query protocol (a script, one implicit
//! transaction, the last statement's result), unless it is one query or DML statement, which
//! runs as the unnamed statement in the pipelined reset's round trip and answers alike
//! ([`Connection::query_one`]); with `params` it is one statement through the extended
//! protocol, whose parameter types PostgreSQL infers ([`StatementCache`] remembers them). A statement PostgreSQL refuses is an answer (`SQL_EXEC_ERROR`), not an error.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use fluxbase_replication::values::{self, TypeRegistry};
use fluxbase_replication::wire::{
    self, Connection, DbError, Phase, StatementResult, TransactionStatus, WireError,
};
use serde_json::Value;

use super::pool::{is_plain_tag, release, PooledConnection};
use super::render::{render_db_error, render_sql_error, render_success};
use super::{AnswerMemory, Sql, SqlError, SqlRequest};
use crate::auth::Access;
use crate::catalog::learn_types;

/// Extra time past `statement_timeout` before the server cancels a statement itself.
const GUARD_GRACE: Duration = Duration::from_secs(2);

/// Parameter types PostgreSQL inferred for statements a project ran before, so that the next
/// run of the same text needs one round trip (`query_oneshot`) instead of two. A stale entry
/// (the schema changed) can only make PostgreSQL refuse a parameter at Bind, before anything
/// ran; the statement is then prepared afresh and the entry replaced.
#[derive(Default)]
pub struct StatementCache {
    params: Mutex<HashMap<String, Arc<[u32]>>>,
}

impl StatementCache {
    const CAPACITY: usize = 1024;

    fn get(&self, sql: &str) -> Option<Arc<[u32]>> {
        self.params.lock().expect("poisoned").get(sql).cloned()
    }

    fn put(&self, sql: &str, types: &[u32]) {
        let mut map = self.params.lock().expect("poisoned");
        if map.len() >= Self::CAPACITY {
            map.clear();
        }
        map.insert(sql.to_string(), types.into());
    }

    fn forget(&self, sql: &str) {
        self.params.lock().expect("poisoned").remove(sql);
    }
}

impl Sql {
    fn statements(&self, project_id: &str) -> Arc<StatementCache> {
        self.statements
            .lock()
            .expect("poisoned")
            .entry(project_id.to_string())
            .or_default()
            .clone()
    }

    /// Runs a request's SQL as `identity` (`auth.uid()`, see [`crate::rls`]) and renders the
    /// guide's success or SQL_EXEC_ERROR body, its rows and text reserved in `memory` as they
    /// are read and rendered ([`super::building`]).
    pub async fn execute(
        &self,
        access: &Access,
        req: &SqlRequest,
        identity: Option<&str>,
        memory: Arc<dyn AnswerMemory>,
    ) -> Result<String, SqlError> {
        let started = Instant::now();
        let rp = self.role_pool(&access.project, access.db_role)?;
        let mut conn = self.checkout(&access.project, &rp).await?;
        let types = self.types(&access.project.id);
        let statements = self.statements(&access.project.id);
        let budget = self.statement_timeout + GUARD_GRACE;
        let backend_key = conn.backend_key();
        // Row data kept while reading; the rendered answer is capped again below (JSON escapes
        // can make it longer than PostgreSQL's text).
        conn.set_max_result_bytes(self.max_response_bytes);
        let outcome = {
            let run = async {
                let PooledConnection {
                    conn,
                    identity: known,
                    ..
                } = &mut *conn;
                self.identities
                    .establish(&access.project, conn, known, identity)
                    .await
                    .map_err(SqlFailure::Identity)?;
                run(conn, req, self.max_rows, &types, &statements, &memory).await
            };
            tokio::pin!(run);
            tokio::select! {
                r = &mut run => r,
                _ = tokio::time::sleep(budget) => {
                    tracing::warn!(project_id = %access.project.id, "statement outlived its budget; cancelling");
                    let _ = wire::cancel(&rp.cfg, backend_key).await;
                    match tokio::time::timeout(Duration::from_secs(5), &mut run).await {
                        Ok(r) => r,
                        Err(_) => Err(SqlFailure::Wire(WireError::Timeout)),
                    }
                }
            }
        };
        // The caller's part succeeded and PostgreSQL answered it with one plain CommandComplete:
        // see `Checkout::ran_one_plain_statement`.
        let outcome = outcome.map(|(result, plain)| {
            if plain {
                conn.ran_one_plain_statement();
            }
            result
        });
        // Never left to a later use of the connection (`run` clears it on its way too).
        conn.set_result_memory(None);
        release(conn);
        let elapsed = started.elapsed();
        self.metrics.observe_sql(elapsed, outcome.is_ok());
        match outcome {
            Ok(result) => {
                let reg = types.read().expect("poisoned");
                Ok(render_success(
                    result,
                    &reg,
                    elapsed,
                    self.max_response_bytes,
                    &*memory,
                ))
            }
            Err(SqlFailure::Param {
                index,
                message,
                sqlstate,
            }) => Ok(render_sql_error(
                &format!("invalid value for parameter ${index}: {message}"),
                &sqlstate,
                "ERROR",
            )),
            Err(SqlFailure::Wire(WireError::Db(e))) if !e.is_fatal() => Ok(render_db_error(&e)),
            Err(SqlFailure::Wire(WireError::InvalidInput(m))) => {
                Ok(render_sql_error(&m, "22021", "ERROR"))
            }
            // The server ended the backend for its memory (`super::memory`): the statement's
            // own doing, answered as PostgreSQL answers running out of memory (53200).
            Err(SqlFailure::Wire(e)) => match self.memory.ended_for_memory(backend_key.0) {
                Some(why) => Ok(render_sql_error(&why, "53200", "ERROR")),
                None => Err(SqlError::Unavailable(e.to_string())),
            },
            Err(SqlFailure::Identity(e)) => {
                tracing::error!(project_id = %access.project.id, error = %e, "could not set the request's identity");
                Err(SqlError::Unavailable(format!(
                    "setting the request's identity: {e}"
                )))
            }
        }
    }
}

enum SqlFailure {
    Wire(WireError),
    /// `auth.set_uid` failed: the caller's SQL was not sent.
    Identity(WireError),
    Param {
        index: usize,
        message: String,
        sqlstate: String,
    },
}

impl From<WireError> for SqlFailure {
    fn from(e: WireError) -> Self {
        SqlFailure::Wire(e)
    }
}

async fn run(
    conn: &mut Connection,
    req: &SqlRequest,
    max_rows: usize,
    types: &RwLock<TypeRegistry>,
    statements: &StatementCache,
    memory: &Arc<dyn AnswerMemory>,
) -> Result<(Option<StatementResult>, bool), SqlFailure> {
    // The caller's rows are reserved as they are read; the server's own statements around
    // them (identity, type lookups) are not the answer's.
    conn.set_result_memory(Some(memory.clone()));
    let outcome = run_caller_sql(conn, req, max_rows, types, statements).await;
    conn.set_result_memory(None);
    let (result, plain) = outcome?;
    if let Some(result) = &result {
        let oids: Vec<u32> = result.columns.iter().map(|c| c.type_oid).collect();
        // A failed transaction cannot run the catalog query; unknown types then render as text.
        if conn.transaction_status() != TransactionStatus::Failed {
            learn_types(conn, types, &oids).await?;
        }
    }
    Ok((result, plain))
}

/// The caller's SQL: its last statement's result, and whether it was plain.
async fn run_caller_sql(
    conn: &mut Connection,
    req: &SqlRequest,
    max_rows: usize,
    types: &RwLock<TypeRegistry>,
    statements: &StatementCache,
) -> Result<(Option<StatementResult>, bool), SqlFailure> {
    // Plain: exactly one CommandComplete, with a plain tag, in PostgreSQL's answer to the
    // caller's SQL (a Query counts every statement that completed; with parameters the extended
    // protocol runs one statement).
    let (result, plain) = match req.params.as_deref() {
        None | Some([]) => {
            // One query or DML statement goes in the same round trip and transaction as the
            // pipelined reset (as with parameters); a script, or anything else, as a Query
            // after the reset on its own. `query_one` sends a text PostgreSQL refuses as one
            // statement as a Query too, so the answer is the Query's either way.
            let outcome = if runs_in_a_transaction(&req.query) {
                conn.query_one(&req.query, max_rows).await?
            } else {
                conn.simple_query(&req.query, max_rows).await?
            };
            let plain = outcome.statements == 1
                && outcome
                    .last
                    .as_ref()
                    .is_some_and(|r| is_plain_tag(&r.command_tag));
            (outcome.last, plain)
        }
        Some(params) => {
            let result = run_with_params(conn, req, params, max_rows, types, statements).await?;
            let plain = is_plain_tag(&result.command_tag);
            (Some(result), plain)
        }
    };
    Ok((result, plain))
}

/// One statement with `$n` parameters: one round trip when the parameter types are known from
/// an earlier run, else prepare (learning them) and execute.
async fn run_with_params(
    conn: &mut Connection,
    req: &SqlRequest,
    params: &[Value],
    max_rows: usize,
    types: &RwLock<TypeRegistry>,
    statements: &StatementCache,
) -> Result<StatementResult, SqlFailure> {
    if let Some(known) = statements
        .get(&req.query)
        .filter(|t| t.len() == params.len())
    {
        let texts = params_to_text(params, &known, types)?;
        let outcome = if runs_in_a_transaction(&req.query) {
            conn.query_cached(&req.query, &texts, max_rows).await
        } else {
            conn.query_oneshot(&req.query, &texts, max_rows).await
        };
        match outcome {
            Err(WireError::Db(e)) if e.phase == Phase::Bind => statements.forget(&req.query),
            other => return Ok(other?),
        }
    }
    let prepared = conn.prepare(&req.query).await?;
    learn_types(conn, types, &prepared.param_types).await?;
    let texts = params_to_text(params, &prepared.param_types, types)?;
    match conn.execute_prepared(&texts, max_rows).await {
        Err(WireError::Db(e)) if e.phase == Phase::Bind => Err(bind_failure(e)),
        other => {
            statements.put(&req.query, &prepared.param_types);
            Ok(other?)
        }
    }
}

/// Whether `sql` starts (after blanks and comments) with a keyword of a statement that may run
/// inside a transaction block, as [`Connection::query_cached`] runs it (with the session reset
/// before it): a query or DML. Anything else (VACUUM, CALL, BEGIN, DDL, ...) takes the unnamed
/// statement, with the reset as a Query of its own.
fn runs_in_a_transaction(sql: &str) -> bool {
    let mut rest = sql;
    loop {
        rest = rest.trim_start();
        if let Some(after) = rest.strip_prefix("--") {
            // PostgreSQL ends a `--` comment at `\r` as well as at `\n` (scan.l's
            // `non_newline`): `--\rVACUUM` is a VACUUM.
            rest = after.split_once(['\n', '\r']).map_or("", |(_, r)| r);
        } else if rest.starts_with("/*") {
            // Nested comments are legal in PostgreSQL: anything unusual is simply not cached.
            match rest[2..].split_once("*/") {
                Some((inside, r)) if !inside.contains("/*") => rest = r,
                _ => return false,
            }
        } else {
            break;
        }
    }
    let word: String = rest
        .chars()
        .take_while(|c| c.is_ascii_alphabetic())
        .collect::<String>()
        .to_ascii_uppercase();
    matches!(
        word.as_str(),
        "SELECT" | "WITH" | "INSERT" | "UPDATE" | "DELETE" | "VALUES" | "TABLE"
    )
}

/// JSON parameters as text input for the types PostgreSQL inferred (text for extra ones, which
/// PostgreSQL then refuses with its own count error).
fn params_to_text(
    params: &[Value],
    param_types: &[u32],
    types: &RwLock<TypeRegistry>,
) -> Result<Vec<Option<String>>, SqlFailure> {
    let reg = types.read().expect("poisoned");
    params
        .iter()
        .enumerate()
        .map(|(i, value)| {
            let oid = param_types.get(i).copied().unwrap_or(25);
            values::param_to_text(value, oid, &reg).map_err(|e| SqlFailure::Param {
                index: i + 1,
                message: e.to_string(),
                sqlstate: "22023".into(),
            })
        })
        .collect()
}

/// A parameter PostgreSQL refused at Bind: name it (`$N`) in the error.
fn bind_failure(e: Box<DbError>) -> SqlFailure {
    let index = e
        .where_
        .as_deref()
        .and_then(|w| w.split('$').nth(1))
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse::<usize>().ok());
    match index {
        Some(index) => SqlFailure::Param {
            index,
            message: e.message,
            sqlstate: e.code,
        },
        None => SqlFailure::Wire(WireError::Db(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_queries_and_dml_run_as_cached_statements() {
        for sql in [
            "SELECT 1",
            "  select $1::int",
            "-- note\nWITH x AS (SELECT 1) SELECT * FROM x",
            "/* c */ INSERT INTO t VALUES ($1)",
            "update t set a = $1",
            "DELETE FROM t WHERE id = $1",
            "VALUES ($1)",
            "TABLE t",
        ] {
            assert!(runs_in_a_transaction(sql), "{sql}");
        }
        for sql in [
            "VACUUM t",
            "CALL p($1)",
            "BEGIN",
            "CREATE INDEX CONCURRENTLY i ON t (a)",
            "/* /* nested */ */ SELECT 1",
            "/* unterminated SELECT 1",
            "SELECTX",
            "",
            "DISCARD ALL",
            "--\rPREPARE p AS SELECT 1 /*\nSELECT*/",
            "-- c\r\nVACUUM t",
        ] {
            assert!(!runs_in_a_transaction(sql), "{sql}");
        }
    }

    #[test]
    fn only_the_tags_of_queries_and_dml_are_plain() {
        use crate::sql::pool::is_plain_tag;
        for tag in [
            "SELECT 1",
            "SELECT 0",
            "INSERT 0 3",
            "UPDATE 2",
            "DELETE 0",
            "MERGE 1",
        ] {
            assert!(is_plain_tag(tag), "{tag}");
        }
        for tag in [
            "PREPARE",
            "DEALLOCATE",
            "DEALLOCATE ALL",
            "LISTEN",
            "DECLARE CURSOR",
            "CALL",
            "DO",
            "SET",
            "COPY 1",
            "FETCH 1",
            "SELECTX 1",
            "select 1",
            "",
        ] {
            assert!(!is_plain_tag(tag), "{tag}");
        }
    }

    #[test]
    fn bind_errors_name_the_parameter() {
        let e = DbError {
            severity: "ERROR".into(),
            code: "22P02".into(),
            message: "invalid input syntax for type integer: \"x\"".into(),
            detail: None,
            hint: None,
            position: None,
            internal_position: None,
            internal_query: None,
            where_: Some("unnamed portal parameter $2 = '...'".into()),
            schema: None,
            table: None,
            column: None,
            datatype: None,
            constraint: None,
            phase: Phase::Bind,
        };
        match bind_failure(Box::new(e)) {
            SqlFailure::Param { index, .. } => assert_eq!(index, 2),
            SqlFailure::Wire(_) | SqlFailure::Identity(_) => {
                panic!("expected a parameter failure")
            }
        }
    }
}
