//! Row-level security: the request's identity as `auth.uid()`, which no SQL sent through the API
//! can change, and the policy API (`/api/rls/policies`), the guide's dashboard steps as endpoints.
//!
//! # Identity
//!
//! Who a request acts for: a member's session → that user's id; an API key → `authUid` in the
//! body or the `X-Fluxbase-Auth-Uid` header (a trusted backend naming its end user, or an org id
//! for the multi-tenant pattern); otherwise nobody (`auth.uid()` is NULL).
//!
//! `current_setting('fluxbase.auth_uid')` alone cannot carry it: the caller's SQL can `SET` it,
//! and admin-scope callers run as the project's owner role, so anything that role owns they can
//! alter. So the identity lives where the project roles cannot reach (`sql/project/0004_rls.sql`):
//!
//! ```text
//!  fx_<id>_auth (NOLOGIN, no members but the admin role) owns schema auth:
//!    auth.identity (pid, uid)   UNLOGGED: never in the WAL, so no db_event, replica or backup
//!    auth.secret   HMAC key     UNLOGGED too; only the owner reads it; reinstalled after a crash
//!    auth.set_uid(uid, tag)     SECURITY DEFINER: sets this backend's row only if
//!                               tag = HMAC-SHA256(key, "<pid>:=<uid>" | "<pid>:-")
//!    auth.uid()                 SECURITY DEFINER, STABLE: this backend's row
//! ```
//! The key is derived from the instance secret (like the role passwords) and installed by the
//! admin role with bound parameters; uid and tag always travel as bound parameters, never in query
//! text (which `pg_stat_activity` shows to sessions of the same role). Both functions pin
//! `search_path = pg_catalog, pg_temp`, so a caller's functions or operators are never resolved
//! inside them. `SET fluxbase.auth_uid`, `set_config`, `RESET`, the same in a function, a CTE or
//! a later statement or transaction change only the setting, never the row; `UPDATE
//! auth.identity`, `CREATE OR REPLACE FUNCTION auth.uid()` are refused by PostgreSQL's
//! privileges; `auth.set_uid` with a guessed tag is refused by the HMAC check.
//!
//! Pooled connections are reused across requests, so each pooled connection remembers the identity
//! its row holds ([`KnownIdentity`]; only the server can change the row, so this is reliable). On
//! checkout:
//!
//! * the identity differs (or the connection is new: a reused pid may have left a row behind):
//!   `SELECT auth.set_uid($1, $2)` runs and is awaited *before* the caller's SQL is sent. This
//!   one is deliberately not pipelined: a Query sent behind it would run even if it failed, and
//!   in the same transaction a caller's `ROLLBACK` (or a procedure's) could undo it and run the
//!   rest under the previous request's identity. It costs one round trip, only when the
//!   identity changes; a connection that never had one costs nothing;
//! * with an identity, `set_config('fluxbase.auth_uid', auth.uid(), false)` is queued as a
//!   prelude in the same write as the caller's SQL (no round trip of its own), for readers of
//!   `current_setting` (the guide's `SET LOCAL fluxbase.auth_uid`). It is set for the session
//!   rather than `LOCAL`: a script may `COMMIT` and go on, and a single `VACUUM` or `CREATE INDEX
//!   CONCURRENTLY` must stay outside any transaction block; `DISCARD ALL` before the
//!   connection's next use clears it. It is informational only: `auth.uid()` reads the row.
//!
//! A backend that never called `set_uid` but reuses the pid of a gone one could see that one's
//! row; the server sets every new pooled connection's row first, and only the server's admin
//! role (which bypasses RLS anyway) opens other sessions on project databases.
//!
//! # Policies
//!
//! `POST` runs, as the project's owner role (never a superuser), in one transaction: `ALTER
//! TABLE … ENABLE ROW LEVEL SECURITY`, `CREATE POLICY`, `COMMENT ON POLICY` (the expressions as
//! given, for the list). Each statement goes through the extended protocol, which refuses more
//! than one command; before that, [`Expression`] lexes each expression (strings, quoted
//! identifiers, dollar quotes, comments) and refuses a `;` or a `)` that would close the
//! `USING (…)` around it, so input like `true) WITH CHECK (false` cannot reshape the statement;
//! PostgreSQL's parser is the last word.
//!
//! *Once per statement*: every `auth.uid()` call is created as `(SELECT auth.uid())`, which
//! PostgreSQL evaluates once as an InitPlan instead of once per row (`EXPLAIN` shows it).
//!
//! *Disabled policies*: PostgreSQL has none. A disabled policy is kept as a policy that applies
//! only to `fx_<id>_auth`, a role no session ever has (`ALTER POLICY … TO`); enabling it gives it
//! back its roles (PUBLIC for policies created here). PostgreSQL keeps its definition and its
//! dependencies (a referenced column cannot be dropped from under it), and no second database has
//! to agree with the project's. The table keeps RLS enabled, so a table whose only policy is
//! disabled shows no rows to the read and readwrite roles. Deleting a policy leaves RLS enabled
//! too (`ALTER TABLE … DISABLE ROW LEVEL SECURITY` through the SQL API turns it off).

use fluxbase_replication::wire::{Connection, DbError, WireError};
use ring::hmac;
use serde_json::{json, Value};
use warp::http::StatusCode;

use crate::api::error::{ApiError, ApiResult};
use crate::app::App;
use crate::auth::{Access, DbRole, Principal, Project};
use crate::db::{quote_ident, quote_literal};

/// The header a trusted backend names its end user with.
pub const AUTH_UID_HEADER: &str = "x-fluxbase-auth-uid";

/// Longest identity accepted, in characters.
const MAX_UID_CHARS: usize = 256;

/// The NOLOGIN role that owns schema `auth` (and holds disabled policies).
pub fn auth_role(project_id: &str) -> String {
    format!("fx_{project_id}_auth")
}

/// What a pooled connection's `auth.identity` row holds, as far as the server knows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum KnownIdentity {
    /// A new connection (its pid may have a stale row), or a change that may have failed.
    #[default]
    Unknown,
    /// The row holds this identity (None: no identity).
    Set(Option<String>),
}

/// The identity a request acts for (see the module docs). `body` is the request's `authUid`.
pub fn request_identity(
    access: &Access,
    body: Option<&Value>,
    header: Option<&warp::http::HeaderValue>,
) -> ApiResult<Option<String>> {
    let from_body = match body {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(valid_uid(s, "authUid")?),
        Some(_) => {
            return Err(ApiError::BadRequest(
                "authUid: expected a string (the end user's id)".into(),
            ))
        }
    };
    let from_header = match header {
        None => None,
        Some(v) => {
            let s = std::str::from_utf8(v.as_bytes()).map_err(|_| {
                ApiError::BadRequest("X-Fluxbase-Auth-Uid: expected UTF-8 text".into())
            })?;
            Some(valid_uid(s.trim(), "X-Fluxbase-Auth-Uid")?)
        }
    };
    let named = match (from_body, from_header) {
        (Some(a), Some(b)) if a != b => {
            return Err(ApiError::BadRequest(
                "authUid and X-Fluxbase-Auth-Uid name different identities".into(),
            ))
        }
        (a, b) => a.or(b),
    };
    match &access.principal {
        Principal::Session { user_id, .. } => match named {
            Some(uid) if &uid != user_id => Err(ApiError::ScopeMismatch(
                "A user session acts as its own user; authUid and X-Fluxbase-Auth-Uid are for \
                 API keys."
                    .into(),
            )),
            _ => Ok(Some(user_id.clone())),
        },
        Principal::Key { .. } => Ok(named),
    }
}

pub(crate) fn valid_uid(s: &str, field: &str) -> ApiResult<String> {
    if s.is_empty() || s.chars().count() > MAX_UID_CHARS || s.chars().any(|c| c.is_control()) {
        return Err(ApiError::BadRequest(format!(
            "{field}: expected 1 to {MAX_UID_CHARS} printable characters"
        )));
    }
    Ok(s.to_string())
}

/// HMAC-SHA256 key of a project's identity tags.
pub(crate) fn identity_key(app: &App, project_id: &str) -> [u8; 32] {
    let hex_key = app.secrets.derive(&format!("rls-identity:{project_id}"));
    let mut key = [0u8; 32];
    hex::decode_to_slice(hex_key, &mut key).expect("derive returns 32 bytes of hex");
    key
}

/// The tag `auth.set_uid` accepts for `uid` on backend `pid`.
pub(crate) fn identity_tag(key: &[u8; 32], pid: i32, uid: Option<&str>) -> String {
    let message = match uid {
        Some(uid) => format!("{pid}:={uid}"),
        None => format!("{pid}:-"),
    };
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    hex::encode(hmac::sign(&key, message.as_bytes()).as_ref())
}

/// HMAC's inner and outer padded keys, the form `auth.secret` holds (SQL has sha256, no hmac).
pub(crate) fn padded_keys(key: &[u8; 32]) -> (Vec<u8>, Vec<u8>) {
    let mut inner = vec![0x36u8; 64];
    let mut outer = vec![0x5cu8; 64];
    for (i, b) in key.iter().enumerate() {
        inner[i] ^= b;
        outer[i] ^= b;
    }
    (inner, outer)
}

/// SQLSTATE `auth.set_uid` raises when `auth.secret` is empty (a new project, or after a crash).
pub(crate) const KEY_MISSING: &str = "FX001";

impl App {
    /// Installs a project's identity key (admin role, bound parameters).
    pub async fn install_identity_key(&self, project: &Project) -> anyhow::Result<()> {
        let (inner, outer) = padded_keys(&identity_key(self, &project.id));
        let client = self.cluster.connect(&project.db_name).await?;
        client
            .execute(
                "INSERT INTO auth.secret (id, inner_key, outer_key) VALUES (true, $1, $2)
                 ON CONFLICT (id) DO UPDATE SET inner_key = EXCLUDED.inner_key,
                                                outer_key = EXCLUDED.outer_key",
                &[&inner, &outer],
            )
            .await?;
        tracing::info!(project_id = %project.id, "installed the identity key");
        Ok(())
    }

    /// Makes `auth.uid()` on this pooled connection return `uid` for the request about to run
    /// (see the module docs): awaited when the row must change, then the `fluxbase.auth_uid`
    /// setting queued in front of the caller's SQL.
    pub(crate) async fn establish_identity(
        &self,
        project: &Project,
        conn: &mut Connection,
        known: &mut KnownIdentity,
        uid: Option<&str>,
    ) -> Result<(), WireError> {
        let wanted = KnownIdentity::Set(uid.map(str::to_owned));
        if *known != wanted {
            *known = KnownIdentity::Unknown;
            let key = identity_key(self, &project.id);
            let tag = identity_tag(&key, conn.backend_key().0, uid);
            let params = [uid.map(str::to_owned), Some(tag)];
            const SET_UID: &str = "SELECT auth.set_uid($1, $2)";
            match conn.query_oneshot(SET_UID, &params, 0).await {
                Err(WireError::Db(e)) if e.code == KEY_MISSING => {
                    self.install_identity_key(project)
                        .await
                        .map_err(|e| WireError::Protocol(format!("installing the key: {e:#}")))?;
                    conn.query_oneshot(SET_UID, &params, 0).await?;
                }
                other => {
                    other?;
                }
            }
            *known = wanted;
            self.metrics.observe_identity_change();
        }
        if uid.is_some() {
            conn.queue_prelude(
                "SELECT pg_catalog.set_config('fluxbase.auth_uid', auth.uid(), false)",
            );
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Policy expressions

/// A policy expression from a developer, checked to be one balanced expression, with every
/// `auth.uid()` wrapped as `(SELECT auth.uid())`.
#[derive(Debug, PartialEq, Eq)]
pub struct Expression {
    /// As given (shown by the list).
    pub original: String,
    /// What goes between the parentheses of `USING (…)` / `WITH CHECK (…)`.
    pub sql: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokenKind {
    Word,
    QuotedIdent,
    Literal,
    Comment,
    Punct(u8),
    Other,
}

#[derive(Debug)]
struct Token {
    kind: TokenKind,
    start: usize,
    end: usize,
}

fn is_ident_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b >= 0x80
}

fn is_ident_char(b: u8) -> bool {
    is_ident_start(b) || b.is_ascii_digit() || b == b'$'
}

/// The index just past a token quoted with `quote` whose first quote is at or after `from`
/// (`'…'` literals with a prefix such as `B'`, `U&"…"` identifiers), where a doubled quote
/// stands for itself; None when it never ends.
fn past_doubled_quotes(s: &[u8], from: usize, quote: u8) -> Option<usize> {
    let mut i = from + s[from..].iter().position(|&c| c == quote)? + 1;
    loop {
        match *s.get(i)? {
            c if c == quote && s.get(i + 1) == Some(&quote) => i += 2,
            c if c == quote => return Some(i + 1),
            _ => i += 1,
        }
    }
}
/// PostgreSQL's lexical structure, as far as it matters here: where strings, quoted
/// identifiers, dollar quotes and comments begin and end (with `standard_conforming_strings` on,
/// which the policy transaction sets), and everything else as words and punctuation.
fn lex(text: &str, field: &str) -> ApiResult<Vec<Token>> {
    let s = text.as_bytes();
    let unterminated = |what: &str| ApiError::BadRequest(format!("{field}: unterminated {what}"));
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < s.len() {
        let start = i;
        let b = s[i];
        let at = |k: usize| s.get(k).copied().unwrap_or(0);
        let kind = if b.is_ascii_whitespace() {
            i += 1;
            continue;
        } else if b == b'-' && at(i + 1) == b'-' {
            while i < s.len() && s[i] != b'\n' && s[i] != b'\r' {
                i += 1;
            }
            TokenKind::Comment
        } else if b == b'/' && at(i + 1) == b'*' {
            let mut depth = 0;
            loop {
                if i + 1 >= s.len() {
                    return Err(unterminated("comment"));
                }
                if s[i] == b'/' && s[i + 1] == b'*' {
                    depth += 1;
                    i += 2;
                } else if s[i] == b'*' && s[i + 1] == b'/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            TokenKind::Comment
        } else if b == b'\'' || (matches!(b, b'e' | b'E') && at(i + 1) == b'\'') {
            let escapes = b != b'\'';
            i += if escapes { 2 } else { 1 };
            loop {
                match s.get(i) {
                    None => return Err(unterminated("string literal")),
                    Some(b'\\') if escapes => i += 2,
                    Some(b'\'') if at(i + 1) == b'\'' => i += 2,
                    Some(b'\'') => {
                        i += 1;
                        break;
                    }
                    Some(_) => i += 1,
                }
            }
            TokenKind::Literal
        } else if matches!(b, b'b' | b'B' | b'x' | b'X' | b'n' | b'N') && at(i + 1) == b'\''
            || matches!(b, b'u' | b'U') && at(i + 1) == b'&' && at(i + 2) == b'\''
        {
            i = past_doubled_quotes(s, i, b'\'').ok_or_else(|| unterminated("string literal"))?;
            TokenKind::Literal
        } else if b == b'"' || (matches!(b, b'u' | b'U') && at(i + 1) == b'&' && at(i + 2) == b'"')
        {
            i = past_doubled_quotes(s, i, b'"').ok_or_else(|| unterminated("quoted identifier"))?;
            TokenKind::QuotedIdent
        } else if b == b'$' && !at(i + 1).is_ascii_digit() {
            // A dollar quote: $tag$ … $tag$ (the tag may be empty).
            let mut j = i + 1;
            while j < s.len() && is_ident_char(s[j]) && s[j] != b'$' {
                j += 1;
            }
            if at(j) != b'$' || (j > i + 1 && !is_ident_start(s[i + 1])) {
                i += 1;
                TokenKind::Other
            } else {
                let tag = &s[i..=j];
                match s[j + 1..].windows(tag.len()).position(|w| w == tag) {
                    Some(p) => i = j + 1 + p + tag.len(),
                    None => return Err(unterminated("dollar-quoted string")),
                }
                TokenKind::Literal
            }
        } else if is_ident_start(b) {
            while i < s.len() && is_ident_char(s[i]) {
                i += 1;
            }
            TokenKind::Word
        } else if b.is_ascii_digit() {
            while i < s.len() && (s[i].is_ascii_alphanumeric() || s[i] == b'.' || s[i] == b'_') {
                i += 1;
            }
            TokenKind::Other
        } else if matches!(b, b'(' | b')' | b';' | b',' | b'.' | b'[' | b']') {
            i += 1;
            TokenKind::Punct(b)
        } else {
            // Operators and anything else: one byte (multi-byte UTF-8 stays whole).
            i += 1;
            while i < s.len() && (s[i] & 0xC0) == 0x80 {
                i += 1;
            }
            TokenKind::Other
        };
        tokens.push(Token {
            kind,
            start,
            end: i,
        });
    }
    Ok(tokens)
}

impl Expression {
    /// Checks `text` (the request's field `field`) and wraps its `auth.uid()` calls.
    pub fn parse(text: &str, field: &str) -> ApiResult<Expression> {
        if text.len() > 16 * 1024 || text.contains('\0') {
            return Err(ApiError::BadRequest(format!(
                "{field}: expected an SQL expression of at most 16 KiB"
            )));
        }
        let tokens = lex(text, field)?;
        let code: Vec<&Token> = tokens
            .iter()
            .filter(|t| t.kind != TokenKind::Comment)
            .collect();
        if code.is_empty() {
            return Err(ApiError::BadRequest(format!(
                "{field}: expected an SQL expression such as user_id = auth.uid()"
            )));
        }
        let mut depth = 0i32;
        for t in &code {
            match t.kind {
                TokenKind::Punct(b';') => {
                    return Err(ApiError::BadRequest(format!(
                        "{field}: expected one SQL expression, found `;`"
                    )))
                }
                TokenKind::Punct(b'(') => depth += 1,
                TokenKind::Punct(b')') => {
                    depth -= 1;
                    if depth < 0 {
                        return Err(ApiError::BadRequest(format!(
                            "{field}: expected one SQL expression, found an unmatched `)` at \
                             byte {}",
                            t.start
                        )));
                    }
                }
                _ => {}
            }
        }
        if depth != 0 {
            return Err(ApiError::BadRequest(format!(
                "{field}: expected one SQL expression, found an unclosed `(`"
            )));
        }

        // Rebuild: comments become a space, `auth.uid()` becomes `(SELECT auth.uid())`.
        let name = |t: &Token| -> Option<String> {
            let raw = &text[t.start..t.end];
            match t.kind {
                TokenKind::Word => Some(raw.to_ascii_lowercase()),
                TokenKind::QuotedIdent if raw.starts_with('"') => {
                    Some(raw[1..raw.len() - 1].replace("\"\"", "\""))
                }
                _ => None,
            }
        };
        let is = |k: usize, p: u8| code.get(k).is_some_and(|t| t.kind == TokenKind::Punct(p));
        let mut sql = String::with_capacity(text.len() + 16);
        let mut copied = 0;
        let mut k = 0;
        while k < code.len() {
            let call = name(code[k]).as_deref() == Some("auth")
                && is(k + 1, b'.')
                && code.get(k + 2).and_then(|t| name(t)).as_deref() == Some("uid")
                && is(k + 3, b'(')
                && is(k + 4, b')');
            let after_select = k > 0 && name(code[k - 1]).as_deref() == Some("select");
            if call && !after_select {
                sql.push_str(&blank_comments(text, &tokens, copied, code[k].start));
                sql.push_str("(SELECT auth.uid())");
                copied = code[k + 4].end;
                k += 5;
            } else {
                k += 1;
            }
        }
        sql.push_str(&blank_comments(text, &tokens, copied, text.len()));
        Ok(Expression {
            original: text.to_string(),
            sql,
        })
    }
}

/// `text[from..to]` with its comments replaced by a space.
fn blank_comments(text: &str, tokens: &[Token], from: usize, to: usize) -> String {
    let mut out = String::with_capacity(to - from);
    let mut at = from;
    for t in tokens
        .iter()
        .filter(|t| t.kind == TokenKind::Comment && t.start >= from && t.end <= to)
    {
        out.push_str(&text[at..t.start]);
        out.push(' ');
        at = t.end;
    }
    out.push_str(&text[at..to]);
    out
}

// ---------------------------------------------------------------------------------------------
// The policy API

/// ALL | SELECT | INSERT | UPDATE | DELETE (the guide's command scopes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Command {
    All,
    Select,
    Insert,
    Update,
    Delete,
}

impl Command {
    fn parse(s: &str) -> Option<Command> {
        match s.to_ascii_uppercase().as_str() {
            "ALL" => Some(Command::All),
            "SELECT" => Some(Command::Select),
            "INSERT" => Some(Command::Insert),
            "UPDATE" => Some(Command::Update),
            "DELETE" => Some(Command::Delete),
            _ => None,
        }
    }
    fn from_polcmd(c: &str) -> &'static str {
        match c {
            "r" => "SELECT",
            "a" => "INSERT",
            "w" => "UPDATE",
            "d" => "DELETE",
            _ => "ALL",
        }
    }
    fn as_str(self) -> &'static str {
        match self {
            Command::All => "ALL",
            Command::Select => "SELECT",
            Command::Insert => "INSERT",
            Command::Update => "UPDATE",
            Command::Delete => "DELETE",
        }
    }
}

/// A string field of a JSON body: required or optional, named in the error.
fn string_field<'a>(body: &'a Value, field: &str, required: bool) -> ApiResult<Option<&'a str>> {
    match body.get(field) {
        None | Some(Value::Null) if !required => Ok(None),
        Some(Value::String(s)) if !s.is_empty() => Ok(Some(s)),
        _ => Err(ApiError::BadRequest(format!(
            "{field}: expected a non-empty string"
        ))),
    }
}

/// A PostgreSQL identifier named by the caller (no truncation: at most 63 bytes).
/// The `schema` (optional), `table` and `name` that name a policy in a request body.
fn policy_ref(body: &Value) -> ApiResult<(TableRef, String)> {
    let table = TableRef::new(
        string_field(body, "schema", false)?,
        string_field(body, "table", true)?.expect("required"),
    )?;
    let name = identifier(string_field(body, "name", true)?.expect("required"), "name")?;
    Ok((table, name.to_string()))
}

fn identifier<'a>(value: &'a str, field: &str) -> ApiResult<&'a str> {
    if value.is_empty() || value.len() > 63 || value.contains('\0') {
        return Err(ApiError::BadRequest(format!(
            "{field}: expected a name of 1 to 63 bytes"
        )));
    }
    Ok(value)
}

/// The table a request names: `table` and optional `schema` (default `public`).
struct TableRef {
    schema: String,
    table: String,
}

impl TableRef {
    fn new(schema: Option<&str>, table: &str) -> ApiResult<TableRef> {
        Ok(TableRef {
            schema: identifier(schema.unwrap_or("public"), "schema")?.to_string(),
            table: identifier(table, "table")?.to_string(),
        })
    }
    fn sql(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.table))
    }
    fn display(&self) -> String {
        format!("{}.{}", self.schema, self.table)
    }
}

/// Schemas of Fluxbase itself, not listed.
const SYSTEM_SCHEMAS: &str =
    "('pg_catalog', 'information_schema', 'auth', 'realtime', 'fluxbase_cdc')";

/// What a policy's comment records (JSON): the expressions as given, the expressions as
/// PostgreSQL printed them right after creation (to notice a later `ALTER POLICY` through SQL),
/// and, while disabled, the roles to give back.
#[derive(serde::Serialize, serde::Deserialize, Default, Clone)]
struct PolicyNote {
    fluxbase: u8,
    using: Option<String>,
    check: Option<String>,
    #[serde(rename = "pgUsing")]
    pg_using: Option<String>,
    #[serde(rename = "pgCheck")]
    pg_check: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    roles: Option<Vec<String>>,
}

/// One row of the catalog query below.
struct PolicyRow {
    schema: String,
    table: String,
    rls_enabled: bool,
    rls_forced: bool,
    policy: Option<PolicyInfo>,
}

struct PolicyInfo {
    name: String,
    command: &'static str,
    using: Option<String>,
    check: Option<String>,
    enabled: bool,
    roles: Vec<String>,
    note: Option<PolicyNote>,
}

impl PolicyInfo {
    fn json(&self) -> Value {
        // The expressions as given, unless they were changed through SQL since.
        let (using, check) = match &self.note {
            Some(n) if n.pg_using == self.using && n.pg_check == self.check => {
                (n.using.clone(), n.check.clone())
            }
            _ => (self.using.clone(), self.check.clone()),
        };
        json!({
            "name": self.name,
            "command": self.command,
            "using": using,
            "check": check,
            "enabled": self.enabled,
        })
    }
}

const CATALOG_QUERY: &str = "
SELECT n.nspname, c.relname, c.relrowsecurity::text, c.relforcerowsecurity::text,
       p.polname, p.polcmd::text,
       pg_catalog.pg_get_expr(p.polqual, p.polrelid),
       pg_catalog.pg_get_expr(p.polwithcheck, p.polrelid),
       (p.polroles = ARRAY[pg_catalog.to_regrole($1)::oid])::text,
       pg_catalog.array_to_json(ARRAY(
           SELECT CASE WHEN r = 0 THEN 'public' ELSE r::regrole::text END
           FROM pg_catalog.unnest(p.polroles) r))::text,
       pg_catalog.obj_description(p.oid, 'pg_policy')
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_catalog.pg_policy p ON p.polrelid = c.oid
WHERE c.relkind IN ('r', 'p') AND n.nspname NOT LIKE 'pg\\_%' AND n.nspname NOT IN ";

fn parse_rows(rows: &[Vec<Option<String>>]) -> Vec<PolicyRow> {
    let text = |r: &Vec<Option<String>>, i: usize| r.get(i).cloned().flatten();
    rows.iter()
        .map(|r| PolicyRow {
            schema: text(r, 0).unwrap_or_default(),
            table: text(r, 1).unwrap_or_default(),
            rls_enabled: text(r, 2).as_deref() == Some("true"),
            rls_forced: text(r, 3).as_deref() == Some("true"),
            policy: text(r, 4).map(|name| PolicyInfo {
                name,
                command: Command::from_polcmd(text(r, 5).as_deref().unwrap_or("*")),
                using: text(r, 6),
                check: text(r, 7),
                enabled: text(r, 8).as_deref() != Some("true"),
                roles: text(r, 9)
                    .and_then(|j| serde_json::from_str(&j).ok())
                    .unwrap_or_default(),
                note: text(r, 10)
                    .and_then(|c| serde_json::from_str::<PolicyNote>(&c).ok())
                    .filter(|n| n.fluxbase == 1),
            }),
        })
        .collect()
}

/// Reads the catalog: every user table, or one table's policies.
async fn read_catalog(
    conn: &mut Connection,
    project_id: &str,
    only: Option<&TableRef>,
) -> Result<Vec<PolicyRow>, WireError> {
    let mut sql = format!("{CATALOG_QUERY}{SYSTEM_SCHEMAS}");
    let mut params = vec![Some(auth_role(project_id))];
    if let Some(t) = only {
        sql.push_str(" AND n.nspname = $2 AND c.relname = $3");
        params.push(Some(t.schema.clone()));
        params.push(Some(t.table.clone()));
    }
    sql.push_str(" ORDER BY 1, 2, 5");
    let result = conn.query_oneshot(&sql, &params, usize::MAX).await?;
    Ok(parse_rows(&result.rows))
}

/// A failed policy statement as the API's error, naming what PostgreSQL named.
fn policy_error(e: &DbError, what: &str) -> ApiError {
    let mut message = format!("{what}: {}", e.message);
    if let Some(detail) = &e.detail {
        message.push_str(&format!(" ({detail})"));
    }
    if let Some(hint) = &e.hint {
        message.push_str(&format!(" Hint: {hint}"));
    }
    match e.code.as_str() {
        "42710" => ApiError::Conflict(message),
        "42704" => ApiError::NotFound(message),
        "42501" => ApiError::InsufficientPermissions(message),
        _ => ApiError::BadRequest(message),
    }
}

enum DdlFailure {
    Api(ApiError),
    Wire(WireError),
}

impl From<WireError> for DdlFailure {
    fn from(e: WireError) -> Self {
        DdlFailure::Wire(e)
    }
}

impl From<ApiError> for DdlFailure {
    fn from(e: ApiError) -> Self {
        DdlFailure::Api(e)
    }
}

impl App {
    /// `GET /api/rls/policies`: every table with its RLS state and policies.
    pub async fn list_policies(&self, access: &Access) -> ApiResult<(StatusCode, Value)> {
        let mut conn = self.sql_connection(&access.project, access.db_role).await?;
        let rows = read_catalog(&mut conn, &access.project.id, None).await;
        crate::sql::release(conn);
        let rows = rows.map_err(|e| ApiError::DatabaseUnavailable(e.to_string()))?;
        let mut tables: Vec<Value> = Vec::new();
        let mut last: Option<(String, String)> = None;
        for row in rows {
            let key = (row.schema.clone(), row.table.clone());
            if last.as_ref() != Some(&key) {
                tables.push(json!({
                    "schema": row.schema,
                    "table": row.table,
                    "rlsEnabled": row.rls_enabled,
                    "rlsForced": row.rls_forced,
                    "policies": [],
                }));
                last = Some(key);
            }
            if let Some(p) = &row.policy {
                let entry = tables.last_mut().expect("pushed above");
                entry["policies"]
                    .as_array_mut()
                    .expect("an array")
                    .push(p.json());
            }
        }
        Ok((StatusCode::OK, json!({ "success": true, "tables": tables })))
    }

    /// `POST /api/rls/policies`: ENABLE ROW LEVEL SECURITY and CREATE POLICY, one transaction.
    pub async fn create_policy(
        &self,
        access: &Access,
        body: &Value,
    ) -> ApiResult<(StatusCode, Value)> {
        access.require_developer("Managing row-level security policies")?;
        let (table, name) = policy_ref(body)?;
        let command_text = string_field(body, "command", true)?.expect("required");
        let command = Command::parse(command_text).ok_or_else(|| {
            ApiError::BadRequest(
                "command: expected one of ALL, SELECT, INSERT, UPDATE, DELETE".into(),
            )
        })?;
        let using = string_field(body, "using", command != Command::Insert)?;
        let check = string_field(body, "check", false)?;
        // PostgreSQL's rules: INSERT has only WITH CHECK, SELECT and DELETE only USING.
        let (using, check) = match command {
            Command::Insert => match (using, check) {
                (Some(_), Some(_)) => {
                    return Err(ApiError::BadRequest(
                        "check: an INSERT policy has one expression (WITH CHECK); give it as \
                         `using` or `check`, not both"
                            .into(),
                    ))
                }
                (Some(e), None) => (None, Some(Expression::parse(e, "using")?)),
                (None, Some(e)) => (None, Some(Expression::parse(e, "check")?)),
                (None, None) => {
                    return Err(ApiError::BadRequest(
                        "using: expected a non-empty string".into(),
                    ))
                }
            },
            Command::Select | Command::Delete if check.is_some() => {
                return Err(ApiError::BadRequest(format!(
                    "check: a {} policy has no WITH CHECK expression",
                    command.as_str()
                )))
            }
            _ => (
                Some(Expression::parse(using.expect("required"), "using")?),
                check.map(|c| Expression::parse(c, "check")).transpose()?,
            ),
        };

        let mut statement = format!(
            "CREATE POLICY {} ON {} AS PERMISSIVE FOR {} TO PUBLIC",
            quote_ident(&name),
            table.sql(),
            command.as_str()
        );
        if let Some(u) = &using {
            statement.push_str(&format!(" USING ({}\n)", u.sql));
        }
        if let Some(c) = &check {
            statement.push_str(&format!(" WITH CHECK ({}\n)", c.sql));
        }
        let statements = vec![
            format!("ALTER TABLE {} ENABLE ROW LEVEL SECURITY", table.sql()),
            statement,
        ];
        let note = PolicyNote {
            fluxbase: 1,
            using: using.map(|e| e.original),
            check: check.map(|e| e.original),
            ..PolicyNote::default()
        };
        let policy = self
            .policy_ddl(access, &table, &name, statements, Some(note), true)
            .await?;
        tracing::info!(project_id = %access.project.id, table = %table.display(), policy = %name, "policy created");
        Ok((
            StatusCode::CREATED,
            json!({ "success": true, "policy": policy }),
        ))
    }

    /// `PATCH /api/rls/policies`: the dashboard's toggle (see the module docs).
    pub async fn toggle_policy(
        &self,
        access: &Access,
        body: &Value,
    ) -> ApiResult<(StatusCode, Value)> {
        access.require_developer("Managing row-level security policies")?;
        let (table, name) = policy_ref(body)?;
        let enabled = match body.get("enabled") {
            Some(Value::Bool(b)) => *b,
            _ => {
                return Err(ApiError::BadRequest(
                    "enabled: expected true or false".into(),
                ))
            }
        };
        let policy = self
            .policy_ddl(access, &table, &name, Vec::new(), None, enabled)
            .await?;
        tracing::info!(project_id = %access.project.id, table = %table.display(), policy = %name, enabled, "policy toggled");
        Ok((StatusCode::OK, json!({ "success": true, "policy": policy })))
    }

    /// `DELETE /api/rls/policies`.
    pub async fn delete_policy(
        &self,
        access: &Access,
        schema: Option<&str>,
        table: &str,
        name: &str,
    ) -> ApiResult<(StatusCode, Value)> {
        access.require_developer("Managing row-level security policies")?;
        let table = TableRef::new(schema, table)?;
        let name = identifier(name, "name")?;
        let mut conn = self.sql_connection(&access.project, DbRole::Owner).await?;
        let outcome = async {
            let rows = read_catalog(&mut conn, &access.project.id, Some(&table)).await?;
            check_policy_exists(&rows, &table, name)?;
            let drop = format!("DROP POLICY {} ON {}", quote_ident(name), table.sql());
            match conn.query_oneshot(&drop, &[], 0).await {
                Err(WireError::Db(e)) if !e.is_fatal() => {
                    Err(DdlFailure::Api(policy_error(&e, "DROP POLICY")))
                }
                other => Ok(other.map(|_| ())?),
            }
        }
        .await;
        crate::sql::release(conn);
        match outcome {
            Ok(()) => {
                tracing::info!(project_id = %access.project.id, table = %table.display(), policy = %name, "policy deleted");
                Ok((StatusCode::OK, json!({ "success": true })))
            }
            Err(DdlFailure::Api(e)) => Err(e),
            Err(DdlFailure::Wire(e)) => Err(ApiError::DatabaseUnavailable(e.to_string())),
        }
    }

    /// Runs a policy change as the owner role in one transaction: `statements` (create), or the
    /// toggle to `enabled`; records `note` (create) in the policy's comment; returns the policy.
    async fn policy_ddl(
        &self,
        access: &Access,
        table: &TableRef,
        name: &str,
        statements: Vec<String>,
        note: Option<PolicyNote>,
        enabled: bool,
    ) -> ApiResult<Value> {
        let mut conn = self.sql_connection(&access.project, DbRole::Owner).await?;
        let outcome = async {
            // `standard_conforming_strings` is what the expression check assumed.
            conn.simple_query("BEGIN; SET LOCAL standard_conforming_strings = on", 0)
                .await?;
            let result = self
                .policy_ddl_in_transaction(
                    &mut conn, access, table, name, statements, note, enabled,
                )
                .await;
            match result {
                Ok(policy) => {
                    conn.simple_query("COMMIT", 0).await?;
                    Ok(policy)
                }
                Err(e) => {
                    conn.simple_query("ROLLBACK", 0).await?;
                    Err(e)
                }
            }
        }
        .await;
        crate::sql::release(conn);
        match outcome {
            Ok(policy) => Ok(policy),
            Err(DdlFailure::Api(e)) => Err(e),
            Err(DdlFailure::Wire(e)) => Err(ApiError::DatabaseUnavailable(e.to_string())),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn policy_ddl_in_transaction(
        &self,
        conn: &mut Connection,
        access: &Access,
        table: &TableRef,
        name: &str,
        statements: Vec<String>,
        note: Option<PolicyNote>,
        enabled: bool,
    ) -> Result<Value, DdlFailure> {
        let project_id = &access.project.id;
        let rows = read_catalog(conn, project_id, Some(table)).await?;
        if rows.is_empty() {
            return Err(ApiError::NotFound(format!(
                "Table \"{}\" does not exist.",
                table.display()
            ))
            .into());
        }
        let mut note = match note {
            Some(note) => note,
            // A toggle: the policy must exist; keep its note.
            None => note_of(check_policy_exists(&rows, table, name)?),
        };
        let create = !statements.is_empty();
        let mut run = statements;
        if !create {
            let current = check_policy_exists(&rows, table, name)?;
            let roles = if enabled {
                run.push(format!(
                    "ALTER TABLE {} ENABLE ROW LEVEL SECURITY",
                    table.sql()
                ));
                if current.enabled {
                    current.roles.clone()
                } else {
                    note.roles.take().unwrap_or_else(|| vec!["public".into()])
                }
            } else {
                if current.enabled {
                    note.roles = Some(current.roles.clone());
                }
                vec![quote_ident(&auth_role(project_id))]
            };
            run.push(format!(
                "ALTER POLICY {} ON {} TO {}",
                quote_ident(name),
                table.sql(),
                roles.join(", ")
            ));
        }
        for sql in &run {
            match conn.query_oneshot(sql, &[], 0).await {
                Err(WireError::Db(e)) if !e.is_fatal() => {
                    let what = format!("Policy \"{name}\" on {}", table.display());
                    return Err(policy_error(&e, &what).into());
                }
                other => {
                    other?;
                }
            }
        }
        // What PostgreSQL made of the expressions, to notice later changes through SQL.
        let rows = read_catalog(conn, project_id, Some(table)).await?;
        let policy = check_policy_exists(&rows, table, name)?;
        if create {
            note.pg_using = policy.using.clone();
            note.pg_check = policy.check.clone();
        }
        let comment = serde_json::to_string(&note).expect("serializable");
        conn.query_oneshot(
            &format!(
                "COMMENT ON POLICY {} ON {} IS {}",
                quote_ident(name),
                table.sql(),
                quote_literal(&comment)
            ),
            &[],
            0,
        )
        .await?;
        let rows = read_catalog(conn, project_id, Some(table)).await?;
        let policy = check_policy_exists(&rows, table, name)?;
        let mut out = policy.json();
        out["schema"] = json!(table.schema);
        out["table"] = json!(table.table);
        Ok(out)
    }
}

/// A policy's note; for one created through SQL, what PostgreSQL shows.
fn note_of(policy: &PolicyInfo) -> PolicyNote {
    policy.note.clone().unwrap_or_else(|| PolicyNote {
        fluxbase: 1,
        using: policy.using.clone(),
        check: policy.check.clone(),
        pg_using: policy.using.clone(),
        pg_check: policy.check.clone(),
        roles: None,
    })
}

fn check_policy_exists<'a>(
    rows: &'a [PolicyRow],
    table: &TableRef,
    name: &str,
) -> Result<&'a PolicyInfo, DdlFailure> {
    if rows.is_empty() {
        return Err(
            ApiError::NotFound(format!("Table \"{}\" does not exist.", table.display())).into(),
        );
    }
    rows.iter()
        .filter_map(|r| r.policy.as_ref())
        .find(|p| p.name == name)
        .ok_or_else(|| {
            ApiError::NotFound(format!(
                "Policy \"{name}\" does not exist on table \"{}\".",
                table.display()
            ))
            .into()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wrap(s: &str) -> String {
        Expression::parse(s, "using").unwrap().sql
    }

    fn refused(s: &str) -> String {
        match Expression::parse(s, "using") {
            Err(ApiError::BadRequest(m)) => m,
            other => panic!("{s:?} should be refused, got {other:?}"),
        }
    }

    #[test]
    fn auth_uid_calls_are_wrapped_once_per_statement() {
        assert_eq!(
            wrap("user_id = auth.uid()"),
            "user_id = (SELECT auth.uid())"
        );
        assert_eq!(
            wrap("org_id = AUTH . UID ( ) OR x = \"auth\".\"uid\"()"),
            "org_id = (SELECT auth.uid()) OR x = (SELECT auth.uid())"
        );
        assert_eq!(
            wrap("user_id::text = auth.uid()"),
            "user_id::text = (SELECT auth.uid())"
        );
        assert_eq!(wrap("a = (SELECT auth.uid())"), "a = (SELECT auth.uid())");
    }

    #[test]
    fn auth_uid_inside_literals_identifiers_and_comments_is_left_alone() {
        assert_eq!(wrap("note = 'auth.uid()'"), "note = 'auth.uid()'");
        assert_eq!(wrap("\"auth.uid()\" = 'x'"), "\"auth.uid()\" = 'x'");
        assert_eq!(wrap("x = $q$auth.uid()$q$"), "x = $q$auth.uid()$q$");
        assert_eq!(wrap("x = E'\\'auth.uid()'"), "x = E'\\'auth.uid()'");
        assert_eq!(wrap("true -- auth.uid()"), "true  ");
        assert_eq!(wrap("true /* a /* b */ ) */"), "true  ");
        assert_eq!(wrap("\"AUTH\".uid() = x"), "\"AUTH\".uid() = x");
    }

    #[test]
    fn anything_but_one_expression_is_refused() {
        assert!(refused("true) WITH CHECK (false").contains("unmatched `)`"));
        assert!(refused("true); DROP TABLE posts; --").contains("unmatched `)`"));
        assert!(refused("true; DROP TABLE posts").contains("`;`"));
        assert!(refused("(true").contains("unclosed"));
        assert!(refused("'unterminated").contains("unterminated"));
        assert!(refused("x = $a$ ) $b$").contains("unterminated"));
        assert!(refused("/* ) ").contains("unterminated"));
        assert!(refused("   -- only a comment").contains("expected an SQL expression"));
        // Inside literals a `)` or `;` is data.
        assert_eq!(wrap("x = ');' AND y = \")\""), "x = ');' AND y = \")\"");
    }

    #[test]
    fn tags_match_the_sql_hmac_construction() {
        let key = [7u8; 32];
        let (inner, outer) = padded_keys(&key);
        let message = b"1234:=alice";
        let inner_hash = crate::secrets::sha256(&[inner, message.to_vec()].concat());
        let tag = hex::encode(crate::secrets::sha256(&[outer, inner_hash].concat()));
        assert_eq!(tag, identity_tag(&key, 1234, Some("alice")));
        assert_ne!(
            identity_tag(&key, 1234, None),
            identity_tag(&key, 1234, Some(""))
        );
        assert_ne!(
            identity_tag(&key, 1234, Some("a")),
            identity_tag(&key, 1235, Some("a"))
        );
    }
}
