//! Statements kept prepared on a connection, and a session reset that travels in the same round
//! trip as the next statement.
//!
//! Why: a point SELECT through the unnamed statement is parsed and planned on every run, and a
//! pooled connection reset with `DISCARD ALL` (its own Query, its own flush) drops every
//! prepared statement with it. Measured on PostgreSQL 15 with pgbench (CPU of the backends per
//! transaction): prepared SELECT 17–21 µs, the same through the unnamed statement 38 µs, with
//! `DISCARD ALL` before it 55–58 µs. So here a statement runs prepared under a name of its own
//! once this connection has seen it ([`Connection::query_cached`]), and the reset is a call the
//! caller chooses ([`Connection::set_session_reset`], e.g. a function that resets what
//! `DISCARD ALL` does but leaves the protocol-level statements alone), sent in the same Sync
//! group as the statement, under the name `fx_reset`:
//!
//! ```text
//!  [Close fx_reset Parse fx_reset (reset)] Bind fx_reset Execute · (prelude: Parse Bind Execute)* ·
//!  [Close evicted] [Parse fx_s<n> Describe] Bind fx_s<n> Execute · Sync
//! ```
//!
//! The caller's SQL can replace any named statement (`DEALLOCATE x; PREPARE x AS …`, also from a
//! function), and a reset bound from a replaced name would run the caller's statement instead of
//! the reset. So the reset is closed and parsed afresh (nothing runs between that Parse and its
//! Bind) unless the caller vouched for the connection's last use and that use was covered
//! ([`Connection::reset_session_vouched`]): one statement, in this reset's own transaction,
//! that could neither run a utility statement nor call a routine that does. Parsing the call
//! costs the backend ≈ 6 µs a request (PostgreSQL 15; docs/benchmarks.md). The statements kept
//! under names (`fx_s<n>`) may be replaced the same way, but the reset runs first in their Sync
//! group and deallocates every SQL-level prepared statement unless it proved there is none, so
//! a replaced one is gone by its Bind (SQLSTATE 26000: prepared afresh below).
//!
//! A text without parameters that should be one query or DML statement goes the same way as
//! the unnamed statement ([`Connection::query_one`]: Parse + Bind + Describe portal + Execute
//! in place of the named statement's messages), falling back to a Query when PostgreSQL
//! refuses it as one statement.
//!
//! All of it is one implicit transaction, so the statement always runs after the reset; if it
//! fails, the reset's transactional part is rolled back with it and stays due for the next
//! operation. Statements that cannot run inside a transaction block (VACUUM, CREATE DATABASE,
//! …) must not come here: callers send those through the other operations, before which a due
//! reset goes as a Query of its own.
//!
//! The server may lose the statements behind this cache's back (`DEALLOCATE ALL`, `DISCARD ALL`
//! run by the caller's SQL, also from inside a function): a Bind that finds its statement gone
//! (SQLSTATE 26000), or a plan whose result type changed (0A000, after DDL), makes the cache
//! forget and the round run once more from Parse; nothing of the statement ran by then.

use std::collections::HashMap;

use super::*;

/// Statements kept prepared per connection; past this the least recently used one is closed.
pub const MAX_CACHED_STATEMENTS: usize = 64;

/// SQLSTATE invalid_sql_statement_name: a prepared statement that does not exist.
const NO_SUCH_STATEMENT: &str = "26000";
/// SQLSTATE feature_not_supported, raised at Bind as "cached plan must not change result type".
const RESULT_TYPE_CHANGED: &str = "0A000";

/// This connection's named statements, by SQL text.
#[derive(Default)]
pub(super) struct StatementCache {
    by_sql: HashMap<String, Cached>,
    next_id: u64,
    clock: u64,
    /// Statements to close with the next round (evicted, or half made).
    to_close: Vec<String>,
}

struct Cached {
    name: String,
    columns: Vec<Column>,
    used: u64,
}

impl StatementCache {
    /// Forgets every statement (the server no longer has them).
    fn forget_all(&mut self) {
        self.by_sql.clear();
        self.to_close.clear();
    }

    /// Forgets every statement but closes each with the next round: some may still be on the
    /// server (one found gone says nothing of the others; Close of a missing name is no error).
    /// Bounded: at most [`MAX_CACHED_STATEMENTS`] names join those already due.
    fn close_all(&mut self) {
        let names = self.by_sql.drain().map(|(_, c)| c.name);
        self.to_close.extend(names);
    }

    fn lookup(&mut self, sql: &str) -> Option<(String, Vec<Column>)> {
        self.clock += 1;
        let clock = self.clock;
        self.by_sql.get_mut(sql).map(|c| {
            c.used = clock;
            (c.name.clone(), c.columns.clone())
        })
    }

    /// A fresh name, after making room by closing the least recently used statement.
    fn new_name(&mut self) -> String {
        if self.by_sql.len() >= MAX_CACHED_STATEMENTS {
            if let Some(sql) = self
                .by_sql
                .iter()
                .min_by_key(|(_, c)| c.used)
                .map(|(sql, _)| sql.clone())
            {
                if let Some(old) = self.by_sql.remove(&sql) {
                    self.to_close.push(old.name);
                }
            }
        }
        self.next_id += 1;
        format!("fx_s{}", self.next_id)
    }
}

/// The reset run between uses of the session (see [`Connection::set_session_reset`]).
pub(super) struct SessionReset {
    /// The call for the statement's own transaction.
    in_pipeline: String,
    /// The call on its own (a Query, its own transaction).
    alone: String,
    pub(super) due: bool,
    /// The last pipelined reset asked to run on its own ([`RESET_ALONE`]).
    alone_next: bool,
    /// `in_pipeline` takes one parameter (`$1`): this value, text or NULL (see
    /// [`Connection::reset_session_with`]). `alone` never takes one.
    takes_arg: bool,
    arg: Option<String>,
    /// The first value of the row the last pipelined reset answered, once its round succeeded
    /// (see [`Connection::take_reset_value`]).
    value: Option<Option<String>>,
    /// The caller vouched for the connection's last use (see
    /// [`Connection::reset_session_vouched`]): the next pipelined reset may be bound from
    /// [`RESET_STATEMENT`] without parsing it, if [`SessionReset::covered`] holds too.
    vouched: bool,
    /// The last operation sent on this connection was a cached round that ran the pipelined
    /// reset and succeeded: the caller's statement ran in the reset's transaction. Cleared by
    /// every operation sent ([`Connection::send`]).
    pub(super) covered: bool,
}

/// The name the pipelined reset is kept under. Parsed afresh (after a Close of whatever has
/// the name) unless the caller vouched for the last use and that use was covered; see
/// [`Connection::reset_session_vouched`] for why a bound name is then the server's own.
const RESET_STATEMENT: &str = "fx_reset";

/// SQLSTATE a pipelined reset raises when it cannot finish inside the statement's transaction
/// (`UNLISTEN` only takes effect at commit): the reset then runs on its own first.
const RESET_ALONE: &str = "FX002";

/// One step of a cached round, in the order the server answers them.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Step {
    ResetClose,
    ResetParse,
    ResetBind,
    ResetExecute,
    PreludeParse,
    PreludeBind,
    PreludeExecute,
    Close,
    Parse,
    Describe,
    Bind,
    Execute,
}

impl Step {
    fn phase(self) -> Phase {
        match self {
            Step::Parse | Step::Describe => Phase::Parse,
            Step::Bind => Phase::Bind,
            Step::Execute => Phase::Execute,
            _ => Phase::Query,
        }
    }

    fn is_reset_or_prelude(self) -> bool {
        matches!(
            self,
            Step::ResetClose
                | Step::ResetParse
                | Step::ResetBind
                | Step::ResetExecute
                | Step::PreludeParse
                | Step::PreludeBind
                | Step::PreludeExecute
        )
    }
}

/// How one round ended.
enum Round {
    Done(Result<StatementResult, WireError>),
    /// The cache was stale; nothing of the statement ran: run the round again.
    Again,
    /// The text is no one statement the extended protocol runs without parameters (several
    /// statements, a `$n`): PostgreSQL refused it at Parse or Bind, before any of it ran, and
    /// what the round took (preludes, Closes) is queued again. Only for
    /// [`Connection::query_one`], which then sends the text as a Query.
    Refused,
}

/// Whether an error of [`Connection::query_one`]'s round says that the text is no single
/// statement that runs without parameters, rather than a statement that failed: PostgreSQL's
/// Parse refuses several statements ("cannot insert multiple commands into a prepared
/// statement", 42601) and a `$n` it cannot type (42P18), and an untyped `$n` makes the Bind of
/// no parameters a protocol error (08P01). Only those: Parse and Bind can run the caller's code
/// (a domain's CHECK on a typed literal, an immutable function folded by the planner), whose
/// effects outside the transaction (`nextval`) a re-send as a Query would repeat; any other
/// error is the statement's answer. (A routine of the project's own that raises one of these
/// codes after such an effect repeats it: its own doing, on its own data.)
fn refused_as_one_statement(at: Step, code: &str) -> bool {
    match at {
        Step::Parse => matches!(code, "42601" | "42P18"),
        Step::Bind => code == "08P01",
        _ => false,
    }
}

impl Connection {
    /// The calls that reset this session between uses, run before the next operation once
    /// [`Connection::reset_session`] asked for it: `in_pipeline` (no parameters) in the same Sync
    /// group as a [`Connection::query_cached`] statement, inside its transaction; `alone` as a
    /// Query of its own in the same write before any other operation, or when `in_pipeline`
    /// raised SQLSTATE `FX002` (it cannot finish inside a transaction).
    pub fn set_session_reset(&mut self, in_pipeline: &str, alone: &str) {
        self.reset = Some(SessionReset {
            in_pipeline: in_pipeline.to_owned(),
            alone: alone.to_owned(),
            due: false,
            alone_next: false,
            takes_arg: false,
            arg: None,
            value: None,
            vouched: false,
            covered: false,
        });
    }

    /// As [`Connection::set_session_reset`], with an `in_pipeline` call that takes one text
    /// parameter (`$1`), bound to what [`Connection::reset_session_with`] gave; `alone` takes
    /// none. The first value of the row the pipelined call answers is kept for
    /// [`Connection::take_reset_value`].
    pub fn set_session_reset_with_arg(&mut self, in_pipeline: &str, alone: &str) {
        self.set_session_reset(in_pipeline, alone);
        if let Some(r) = &mut self.reset {
            r.takes_arg = true;
        }
    }

    /// Resets the session before the next operation: the call of
    /// [`Connection::set_session_reset`], or `DISCARD ALL` without one.
    pub fn reset_session(&mut self) {
        self.reset_session_with(None);
    }

    /// [`Connection::reset_session`], binding `arg` to the pipelined call's `$1` (see
    /// [`Connection::set_session_reset_with_arg`]); a reset still due from before takes the new
    /// value. The call on its own never gets it.
    pub fn reset_session_with(&mut self, arg: Option<String>) {
        match &mut self.reset {
            Some(reset) => {
                reset.due = true;
                reset.arg = arg;
                reset.vouched = false;
            }
            None => {
                self.cached.forget_all();
                self.queue_prelude("DISCARD ALL");
            }
        }
    }

    /// [`Connection::reset_session_with`], the caller vouching that the caller's part of the
    /// connection's last use was one statement that succeeded, answered with one CommandComplete
    /// whose tag makes none of the state only utility statements make, and that the reset of
    /// that use proved (by what it answered) that no routine of the caller's own could run. Then,
    /// if that statement ran in the pipelined reset's own transaction (the last operation was
    /// such a [`Connection::query_cached`] round), the next pipelined reset is a Bind of the
    /// statement kept under [`RESET_STATEMENT`] instead of Close + Parse + Bind.
    ///
    /// Why a bound name is then the server's: SQL can replace a named statement only with
    /// utility statements (`DEALLOCATE`, `PREPARE`, `DISCARD ALL`), run at top level (a
    /// CommandComplete of its own) or from a routine (a built-in that runs SQL text refuses
    /// them). The reset's proof covers its whole transaction because routine DDL waits for
    /// it (sql/project/0017_routine_epoch_lock.sql). Every other reset parses the name afresh,
    /// with nothing run between that Parse and its Bind; the full reset also deallocates every
    /// statement SQL prepared.
    pub fn reset_session_vouched(&mut self, arg: Option<String>) {
        self.reset_session_with(arg);
        if let Some(reset) = &mut self.reset {
            reset.vouched = true;
        }
    }

    /// What the last pipelined reset answered (the first value of its row, NULL as `None`), if
    /// one ran in a round that succeeded since the last call; a reset run on its own answers
    /// nothing here.
    pub fn take_reset_value(&mut self) -> Option<Option<String>> {
        self.reset.as_mut().and_then(|r| r.value.take())
    }

    /// How many statements this connection keeps prepared.
    pub fn cached_statements(&self) -> usize {
        self.cached.by_sql.len()
    }

    /// A due session reset as a Query ahead of another operation's messages (see
    /// [`Connection::encode_with_prelude`]).
    pub(super) fn due_reset_query(&self) -> Option<String> {
        self.reset
            .as_ref()
            .filter(|r| r.due)
            .map(|r| r.alone.clone())
    }

    /// A due reset has run.
    pub(super) fn reset_done(&mut self) {
        if let Some(r) = &mut self.reset {
            r.due = false;
            r.alone_next = false;
            r.vouched = false;
        }
    }

    /// A command tag of the caller's SQL: `DEALLOCATE ALL` and `DISCARD ALL` also take this
    /// connection's statements.
    pub(super) fn saw_tag(&mut self, tag: &str) {
        if tag == "DISCARD ALL" || tag == "DEALLOCATE ALL" {
            self.cached.forget_all();
        }
    }

    /// Runs `sql` (one statement that may run inside a transaction block: a query or DML) with
    /// text parameters as a statement prepared on this connection: Parse + Describe the first
    /// time, then Bind + Execute only, in one round trip either way, after a due session reset
    /// and the queued preludes in the same Sync group. Errors carry [`Phase::Parse`] (the
    /// statement), [`Phase::Bind`] (a parameter, or planning) or [`Phase::Execute`]; a failed
    /// reset or prelude breaks the connection.
    pub async fn query_cached(
        &mut self,
        sql: &str,
        params: &[Option<String>],
        max_rows: usize,
    ) -> Result<StatementResult, WireError> {
        self.ensure_usable()?;
        for _ in 0..2 {
            match self.cached_round(sql, params, max_rows, true).await? {
                Round::Done(result) => return result,
                Round::Again => continue,
                Round::Refused => unreachable!("only an unnamed round is refused"),
            }
        }
        Err(self.fail(WireError::protocol(
            "the prepared statement kept disappearing",
        )))
    }

    /// Runs `sql`, a text without parameters that the caller expects to be one statement that
    /// may run inside a transaction block (a query or DML), and answers what
    /// [`Connection::simple_query`] would: as the unnamed statement (Parse + Bind + Describe +
    /// Execute) in the same Sync group as a due session reset and the queued preludes, inside
    /// their transaction, as [`Connection::query_cached`] runs a statement — so the reset is
    /// the pipelined one (bound from its kept name when vouched for) instead of the reset on its
    /// own, `BEGIN` and `COMMIT` in front of a Query. Kept unnamed: such texts carry their
    /// values inline and rarely repeat, and must not evict the statements kept under names.
    ///
    /// When PostgreSQL refuses the text as one statement (see [`refused_as_one_statement`]:
    /// several statements, a `$n`, or any error of the text that a Query raises as well),
    /// nothing of it ran: the round's reset was rolled back with its transaction and stays due,
    /// its preludes are queued again, and the text goes as a Query ([`Connection::simple_query`],
    /// with the reset on its own in front). Such a use never counts as covered by a pipelined
    /// reset: that Query's send clears it.
    pub async fn query_one(
        &mut self,
        sql: &str,
        max_rows: usize,
    ) -> Result<SimpleOutcome, WireError> {
        self.ensure_usable()?;
        for _ in 0..2 {
            match self.cached_round(sql, &[], max_rows, false).await? {
                Round::Done(result) => {
                    return result.map(|last| SimpleOutcome {
                        last: Some(last),
                        statements: 1,
                    })
                }
                Round::Again => continue,
                Round::Refused => return self.simple_query(sql, max_rows).await,
            }
        }
        Err(self.fail(WireError::protocol(
            "the kept session reset kept disappearing",
        )))
    }

    /// One round: `keep` runs `sql` under a name of this cache (Parse + Describe the first
    /// time), else as the unnamed statement (Parse + Bind + Describe portal + Execute).
    async fn cached_round(
        &mut self,
        sql: &str,
        params: &[Option<String>],
        max_rows: usize,
        keep: bool,
    ) -> Result<Round, WireError> {
        // The reset on its own (after FX002) runs first, in a round trip of its own: PostgreSQL
        // would run the messages that follow a failed Query (see `Connection::queue_prelude`).
        if self.reset.as_ref().is_some_and(|r| r.due && r.alone_next) {
            self.run_preludes().await?;
        }
        let known = if keep { self.cached.lookup(sql) } else { None };
        let name = match &known {
            Some((name, _)) => name.clone(),
            None if keep => self.cached.new_name(),
            None => String::new(),
        };
        let due = self.reset.as_ref().filter(|r| r.due);
        let reset = due.map(|r| {
            let args = if r.takes_arg {
                vec![r.arg.clone()]
            } else {
                Vec::new()
            };
            (r.in_pipeline.clone(), args, r.vouched && r.covered)
        });
        let mut preludes = std::mem::take(&mut self.prelude);
        let mut to_close = std::mem::take(&mut self.cached.to_close);
        let mut steps = Vec::with_capacity(8 + 3 * preludes.len());
        let encoded = self.transport.encode(|buf| {
            if let Some((call, args, bound)) = &reset {
                if !bound {
                    // Whatever has the name goes first (Close of a missing name is no error);
                    // nothing runs between this Parse and its Bind.
                    frontend::close(b'S', RESET_STATEMENT, buf).map_err(|e| e.to_string())?;
                    frontend::parse(RESET_STATEMENT, call, std::iter::empty(), buf)
                        .map_err(|e| e.to_string())?;
                    steps.extend([Step::ResetClose, Step::ResetParse]);
                }
                encode_bind(RESET_STATEMENT, args, buf)?;
                frontend::execute("", 0, buf).map_err(|e| e.to_string())?;
                steps.extend([Step::ResetBind, Step::ResetExecute]);
            }
            for prelude in &preludes {
                frontend::parse("", prelude, std::iter::empty(), buf).map_err(|e| e.to_string())?;
                encode_bind("", &[], buf)?;
                frontend::execute("", 0, buf).map_err(|e| e.to_string())?;
                steps.extend([Step::PreludeParse, Step::PreludeBind, Step::PreludeExecute]);
            }
            for old in &to_close {
                frontend::close(b'S', old, buf).map_err(|e| e.to_string())?;
                steps.push(Step::Close);
            }
            if !keep {
                frontend::parse("", sql, std::iter::empty(), buf).map_err(|e| e.to_string())?;
                encode_bind("", params, buf)?;
                frontend::describe(b'P', "", buf).map_err(|e| e.to_string())?;
                frontend::execute("", 0, buf).map_err(|e| e.to_string())?;
                steps.extend([Step::Parse, Step::Bind, Step::Describe, Step::Execute]);
            } else {
                if known.is_none() {
                    frontend::parse(&name, sql, std::iter::empty(), buf)
                        .map_err(|e| e.to_string())?;
                    frontend::describe(b'S', &name, buf).map_err(|e| e.to_string())?;
                    steps.extend([Step::Parse, Step::Describe]);
                }
                encode_bind(&name, params, buf)?;
                frontend::execute("", 0, buf).map_err(|e| e.to_string())?;
                steps.extend([Step::Bind, Step::Execute]);
            }
            frontend::sync(buf);
            Ok::<_, String>(())
        });
        if let Err(e) = encoded {
            // Nothing was sent. The preludes belong to this operation (e.g. the request's
            // identity setting): dropped with it, never left queued for a later one. The Closes
            // stay due (the server still has those statements); a due reset stays due.
            self.transport.write_buf.clear();
            drop(preludes);
            self.cached.to_close = to_close;
            return Ok(Round::Done(Err(e)));
        }
        self.send().await?;

        let mut next = 0;
        let mut columns = known.as_ref().map(|(_, c)| c.clone());
        let mut parsed = false;
        let mut builder: Option<ResultBuilder> = None;
        let mut result = None;
        let mut error: Option<(Step, Box<DbError>)> = None;
        let mut reset_value: Option<Option<String>> = None;
        self.skipped_row = false;
        loop {
            let step = steps.get(next).copied();
            match self.recv().await? {
                Message::ParseComplete => {
                    if step == Some(Step::Parse) {
                        parsed = true;
                    }
                    next += 1;
                }
                Message::BindComplete | Message::CloseComplete => {
                    if step == Some(Step::Bind) {
                        builder = Some(
                            self.result_builder(columns.clone().unwrap_or_default(), max_rows),
                        );
                    }
                    next += 1;
                }
                Message::ParameterDescription(_) => {}
                Message::RowDescription(body) => {
                    let described = self.columns(&body)?;
                    // The portal's description (unnamed) comes after its BindComplete.
                    if let Some(b) = builder.as_mut() {
                        b.columns = described.clone();
                    }
                    columns = Some(described);
                    next += 1;
                }
                Message::NoData => {
                    columns = Some(Vec::new());
                    next += 1;
                }
                Message::DataRow(row) => {
                    if step == Some(Step::ResetExecute) {
                        reset_value = Some(first_value(&row).map_err(|e| self.fail(e))?);
                    }
                    if step == Some(Step::Execute) {
                        if let Some(b) = builder.as_mut() {
                            if self.take_skipped_row() {
                                b.truncated = true;
                            }
                            b.push(&row).map_err(|e| self.fail(e))?;
                        }
                    }
                }
                Message::CommandComplete(body) => {
                    let tag = body.tag().map_err(|e| self.fail(WireError::protocol(e)))?;
                    if step == Some(Step::Execute) {
                        let mut done = builder
                            .take()
                            .unwrap_or_else(|| ResultBuilder::new(Vec::new(), 0, 0));
                        if self.take_skipped_row() {
                            done.truncated = true;
                        }
                        result = Some(done.finish(tag));
                    }
                    self.saw_tag(tag);
                    next += 1;
                }
                Message::EmptyQueryResponse => {
                    if step == Some(Step::Execute) {
                        result = Some(StatementResult::default());
                    }
                    next += 1;
                }
                Message::ErrorResponse(body) => {
                    let at = step.unwrap_or(Step::Execute);
                    let e = self.recoverable_error(&body, at.phase())?;
                    error.get_or_insert((at, e));
                }
                Message::CopyInResponse(_) => self.refuse_copy_in(true).await?,
                Message::CopyOutResponse(_) | Message::CopyData(_) | Message::CopyDone => {}
                Message::ReadyForQuery(body) => {
                    self.ready(&body)?;
                    break;
                }
                other => return Err(self.unexpected(&other, "cached statement")),
            }
        }
        if keep && known.is_none() && parsed {
            match columns {
                Some(columns) => {
                    self.cached.clock += 1;
                    self.cached.by_sql.insert(
                        sql.to_owned(),
                        Cached {
                            name: name.clone(),
                            columns,
                            used: self.cached.clock,
                        },
                    );
                }
                // Parsed but not described: the server has it, this cache does not.
                None => self.cached.to_close.push(name.clone()),
            }
        }
        let bound = reset.as_ref().is_some_and(|r| r.2);
        debug!(
            pid = self.backend_key.0,
            statement = %name,
            reset = reset.is_some(),
            reset_bound = bound,
            failed = error.is_some(),
            "executed a cached statement"
        );
        let Some((at, e)) = error else {
            self.reset_done();
            if let (Some(value), Some(r)) = (reset_value, &mut self.reset) {
                r.value = Some(value);
            }
            if let (true, Some(r)) = (reset.is_some(), &mut self.reset) {
                r.covered = true;
            }
            return Ok(Round::Done(result.ok_or_else(|| {
                self.fail(WireError::protocol("execute ended without CommandComplete"))
            })));
        };
        // The implicit transaction failed: whatever the reset did that is transactional was
        // rolled back, so it is still due.
        // A round run again must send what this one took and never ran (everything after the
        // error in the Sync group was skipped): the preludes, e.g. an identity's settings, ahead
        // of any queued since, and the Closes.
        let mut again = |conn: &mut Self| {
            conn.prelude.splice(0..0, preludes.drain(..));
            conn.cached.to_close.append(&mut to_close);
        };
        if at == Step::ResetExecute && e.code == RESET_ALONE {
            if let Some(r) = &mut self.reset {
                r.alone_next = true;
            }
            again(self);
            return Ok(Round::Again);
        }
        if at == Step::ResetBind && bound && e.code == NO_SUCH_STATEMENT {
            // The kept reset is gone (nothing ran: the Bind failed): parsed afresh, since this
            // round's send cleared `covered`.
            again(self);
            return Ok(Round::Again);
        }
        if !keep && refused_as_one_statement(at, &e.code) {
            debug!(pid = self.backend_key.0, code = %e.code, "not one statement: sent as a Query");
            again(self);
            return Ok(Round::Refused);
        }
        if at.is_reset_or_prelude() {
            self.broken = true;
            return Err(WireError::Protocol(format!(
                "session reset failed: {}",
                e.message
            )));
        }
        if at == Step::Bind && known.is_some() {
            if e.code == NO_SUCH_STATEMENT {
                // A caller's `DEALLOCATE fx_s<n>` took this one; the others stay on the server
                // until closed (else each such request would leave up to 64 of them behind).
                self.cached.close_all();
                again(self);
                return Ok(Round::Again);
            }
            if e.code == RESULT_TYPE_CHANGED {
                self.cached.by_sql.remove(sql);
                self.cached.to_close.push(name);
                again(self);
                return Ok(Round::Again);
            }
        }
        Ok(Round::Done(Err(WireError::Db(e))))
    }
}

/// The first value of a DataRow as text (`None`: NULL or no value).
fn first_value(row: &DataRowBody) -> Result<Option<String>, WireError> {
    let buf = row.buffer();
    let first = row.ranges().next().map_err(WireError::protocol)?;
    Ok(first
        .flatten()
        .map(|r| String::from_utf8_lossy(&buf[r]).into_owned()))
}
