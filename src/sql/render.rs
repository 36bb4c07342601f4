//! The answer of `POST /api/execute-sql` as JSON text, written straight from PostgreSQL's text
//! values ([`values::write_json`], PostgreSQL's `to_json` rules) without building a
//! `serde_json::Value` per row: the hot path of the SQL API.
//!
//! The shapes written here are described for the OpenAPI document by [`SqlResponse`] (success
//! or `SQL_EXEC_ERROR`, both with HTTP 200); a test reads rendered answers back through those
//! types, so the document and the bytes cannot drift apart.

use std::time::Duration;

use fluxbase_replication::values::{self, TypeRegistry};
use fluxbase_replication::wire::{row_footprint, DbError, StatementResult};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

use super::building::{AnswerMemory, AnswerText};

/// What `POST /api/execute-sql` answers with HTTP 200: the statement's result, or the error
/// PostgreSQL raised (always check `success`).
#[derive(Deserialize, ToSchema)]
#[serde(untagged)]
pub enum SqlResponse {
    Success(SqlSuccess),
    Error(SqlErrorBody),
}

/// `success: true` and the last statement's result.
#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SqlSuccess {
    /// Always `true`.
    pub success: bool,
    pub result: SqlResult,
    pub execution_info: ExecutionInfo,
}

#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SqlResult {
    /// One object per row, column name → value as PostgreSQL's `to_json` renders it.
    #[schema(value_type = Vec<Object>)]
    pub rows: Vec<Map<String, Value>>,
    /// The column names, in order.
    pub columns: Vec<String>,
    /// Each column's PostgreSQL type, in the same order: `int4`, `text`, `timestamptz`,
    /// `int4[]`, a user-defined type's name.
    pub column_types: Vec<String>,
    /// Rows produced or affected (all of them, also when `rows` was truncated).
    pub row_count: u64,
    /// `null` for SELECT, else the command tag (`INSERT 0 1`, `CREATE TABLE`).
    pub message: Option<String>,
    /// `rows` stopped at `max_rows` or `max_response_bytes`.
    pub truncated: bool,
}

#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExecutionInfo {
    /// Milliseconds, e.g. `"11ms"`.
    pub time: String,
    pub row_count: u64,
    /// The command (`SELECT`, `INSERT`, `CREATE TABLE`); `null` for an empty query.
    pub operation: Option<String>,
}

/// `success: false` and the error PostgreSQL raised (or a parameter it could not take).
#[derive(Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SqlErrorBody {
    /// Always `false`.
    pub success: bool,
    pub error: SqlErrorDetail,
}

/// The only code of an error answered with 200.
#[derive(Serialize, Deserialize, ToSchema)]
pub enum SqlErrorCode {
    #[serde(rename = "SQL_EXEC_ERROR")]
    SqlExecError,
}

#[derive(Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SqlErrorDetail {
    pub message: String,
    pub code: SqlErrorCode,
    /// Severity and SQLSTATE, e.g. `"ERROR:  42P01"`.
    pub details: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// 1-based character offset of the error in `query`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<u32>,
}

/// The verb of a command tag: `INSERT 0 1` → `INSERT`, `CREATE TABLE` → `CREATE TABLE`.
pub fn operation(tag: &str) -> String {
    tag.split(' ')
        .filter(|w| !w.is_empty() && !w.bytes().all(|b| b.is_ascii_digit()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Rows returned or affected: the tag's count, else the rows we have.
pub fn row_count(tag: &str, rows: usize) -> u64 {
    tag.rsplit(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(rows as u64)
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).expect("strings serialize")
}

/// The success body, at most about `max_bytes` long: rows that would pass it are left out and
/// the answer says `truncated: true`. Built within `memory`: the rows are rendered into a text
/// grown in covered steps and dropped as they are rendered; once a step is refused no further
/// row is rendered (`truncated`, and the caller sees the refusal in `memory`).
pub(super) fn render_success(
    result: Option<StatementResult>,
    reg: &TypeRegistry,
    elapsed: Duration,
    max_bytes: usize,
    memory: &dyn AnswerMemory,
) -> String {
    let StatementResult {
        columns,
        rows,
        truncated,
        command_tag,
    } = result.unwrap_or_default();
    let op = operation(&command_tag);
    let count = row_count(&command_tag, rows.len());
    let names: Vec<String> = columns.iter().map(|c| json_str(&c.name)).collect();
    // What follows the rows: column names, counts, message, timing.
    let tail = 256
        + names.iter().map(|n| n.len() + 1).sum::<usize>()
        + columns.len() * 70
        + command_tag.len() * 2;
    let row_budget = max_bytes.saturating_sub(tail);
    let mut truncated = truncated;
    let held: usize = rows.iter().map(|r| row_footprint(r)).sum();
    let mut text = AnswerText::new(
        memory,
        (128 + rows.len() * 64).min(row_budget) + tail,
        row_budget + tail,
        held,
    );
    const HEAD: &str = "{\"success\":true,\"result\":{\"rows\":[";
    text.out.push_str(HEAD);
    // A row's text without escapes: what the text is grown by before it is written.
    let names_len = names.iter().map(|n| n.len() + 4).sum::<usize>() + 2;
    for (i, row) in rows.into_iter().enumerate() {
        let foreseen = names_len + row.iter().flatten().map(String::len).sum::<usize>();
        if !text.reserve(foreseen) {
            truncated = true;
            break;
        }
        let out = &mut text.out;
        let mark = out.len();
        if i > 0 {
            out.push(',');
        }
        out.push('{');
        for (j, (col, value)) in columns.iter().zip(&row).enumerate() {
            if j > 0 {
                out.push(',');
            }
            out.push_str(&names[j]);
            out.push(':');
            values::write_json(out, col.type_oid, value.as_deref(), reg);
        }
        out.push('}');
        if out.len() > row_budget {
            out.truncate(mark);
            truncated = true;
            break;
        }
        // The row is dropped at the end of this turn.
        text.others -= row_footprint(&row);
        if !text.check() {
            truncated = true;
            break;
        }
    }
    if text.refused() {
        // Refused a step: no row is kept (the answer is refused, or sent without its rows),
        // and what they took is given back now.
        text.out.truncate(HEAD.len());
        text.out.shrink_to_fit();
    }
    // Rows not rendered (past a bound) are dropped here.
    text.others = 0;
    let mut out = text.into_string();
    out.push_str("],\"columns\":[");
    out.push_str(&names.join(","));
    out.push_str("],\"columnTypes\":[");
    for (j, col) in columns.iter().enumerate() {
        if j > 0 {
            out.push(',');
        }
        out.push_str(&json_str(&reg.type_name(col.type_oid)));
    }
    out.push_str("],\"rowCount\":");
    out.push_str(&count.to_string());
    out.push_str(",\"message\":");
    if op == "SELECT" || command_tag.is_empty() {
        out.push_str("null");
    } else {
        out.push_str(&json_str(&command_tag));
    }
    out.push_str(",\"truncated\":");
    out.push_str(if truncated { "true" } else { "false" });
    out.push_str("},\"executionInfo\":{\"time\":");
    out.push_str(&json_str(&format!("{}ms", elapsed.as_millis())));
    out.push_str(",\"rowCount\":");
    out.push_str(&count.to_string());
    out.push_str(",\"operation\":");
    if op.is_empty() {
        out.push_str("null");
    } else {
        out.push_str(&json_str(&op));
    }
    out.push_str("}}");
    out
}

pub(super) fn render_db_error(e: &DbError) -> String {
    let severity = if e.severity.is_empty() {
        "ERROR"
    } else {
        &e.severity
    };
    let mut body = sql_error(&e.message, &e.code, severity);
    body.error.hint = e.hint.clone();
    body.error.detail = e.detail.clone();
    body.error.position = e.position;
    serde_json::to_string(&body).expect("serializable")
}

pub(super) fn render_sql_error(message: &str, sqlstate: &str, severity: &str) -> String {
    serde_json::to_string(&sql_error(message, sqlstate, severity)).expect("serializable")
}

fn sql_error(message: &str, sqlstate: &str, severity: &str) -> SqlErrorBody {
    SqlErrorBody {
        success: false,
        error: SqlErrorDetail {
            message: message.to_string(),
            code: SqlErrorCode::SqlExecError,
            details: format!("{severity}:  {sqlstate}"),
            hint: None,
            detail: None,
            position: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_and_counts_come_from_the_command_tag() {
        assert_eq!(operation("SELECT 3"), "SELECT");
        assert_eq!(operation("INSERT 0 12"), "INSERT");
        assert_eq!(operation("CREATE TABLE"), "CREATE TABLE");
        assert_eq!(row_count("INSERT 0 12", 0), 12);
        assert_eq!(row_count("UPDATE 4", 0), 4);
        assert_eq!(row_count("CREATE TABLE", 0), 0);
    }

    fn column(name: &str, type_oid: u32) -> fluxbase_replication::wire::Column {
        fluxbase_replication::wire::Column {
            name: name.into(),
            type_oid,
            type_modifier: -1,
            table_oid: 0,
            column_id: 0,
        }
    }

    /// The document's schema ([`SqlResponse`]) reads every shape the renderer writes.
    #[test]
    fn rendered_answers_match_the_documented_shapes() {
        let reg = TypeRegistry::new();
        let select = StatementResult {
            columns: vec![column("id", 23), column("title", 25)],
            rows: vec![
                vec![Some("1".into()), Some("a \"b\"".into())],
                vec![Some("2".into()), None],
            ],
            truncated: false,
            command_tag: "SELECT 2".into(),
        };
        let insert = StatementResult {
            command_tag: "INSERT 0 1".into(),
            ..Default::default()
        };
        for (result, max_bytes) in [
            (Some(&select), 1 << 20),
            (Some(&select), 300),
            (Some(&insert), 1 << 20),
            (None, 1 << 20),
        ] {
            let text = render_success(
                result.cloned(),
                &reg,
                Duration::from_millis(3),
                max_bytes,
                &super::super::building::Unbounded,
            );
            match serde_json::from_str::<SqlResponse>(&text) {
                Ok(SqlResponse::Success(s)) => {
                    assert!(s.success);
                    assert_eq!(s.result.row_count, s.execution_info.row_count);
                    assert_eq!(s.result.columns.len(), s.result.column_types.len());
                    if result == Some(&select) {
                        assert_eq!(s.result.column_types, ["int4", "text"]);
                    }
                }
                _ => panic!("{text} does not match SqlSuccess"),
            }
        }
        let db = DbError {
            severity: "ERROR".into(),
            code: "42P01".into(),
            message: "relation \"usrs\" does not exist".into(),
            detail: Some("d".into()),
            hint: Some("h".into()),
            position: Some(15),
            internal_position: None,
            internal_query: None,
            where_: None,
            schema: None,
            table: None,
            column: None,
            datatype: None,
            constraint: None,
            phase: fluxbase_replication::wire::Phase::Query,
        };
        for text in [
            render_db_error(&db),
            render_sql_error("bad", "22023", "ERROR"),
        ] {
            let value: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(value["error"]["code"], "SQL_EXEC_ERROR");
            match serde_json::from_str::<SqlResponse>(&text) {
                Ok(SqlResponse::Error(e)) => assert!(!e.success),
                _ => panic!("{text} does not match SqlErrorBody"),
            }
        }
        assert_eq!(
            serde_json::from_str::<Value>(&render_db_error(&db)).unwrap()["error"],
            serde_json::json!({ "message": "relation \"usrs\" does not exist", "code": "SQL_EXEC_ERROR",
                                "details": "ERROR:  42P01", "hint": "h", "detail": "d", "position": 15 })
        );
    }
}
