//! role (which bypasses RLS anyway) opens other sessions on project databases.
//!
//! The policy API (`/api/rls/policies`): the guide's dashboard steps as endpoints.
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

use std::sync::Arc;

use fluxbase_replication::wire::{Connection, DbError, WireError};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::expression::Expression;
use super::identity::auth_role;
use super::RlsError;
use crate::auth::{Access, DbRole};
use crate::db::{quote_ident, quote_literal};
use crate::sql::{release, Sql};

/// ALL | SELECT | INSERT | UPDATE | DELETE (the guide's command scopes). Requests may give it
/// in any case.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum Command {
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
    fn from_polcmd(c: &str) -> Command {
        match c {
            "r" => Command::Select,
            "a" => Command::Insert,
            "w" => Command::Update,
            "d" => Command::Delete,
            _ => Command::All,
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

/// A body field as sent: missing (or null), of the expected type, or of another one. Read
/// this way so that a missing or mistyped value is refused with the field's name, as the API
/// refuses every other invalid field.
#[derive(Debug, Default)]
pub enum Field<T> {
    #[default]
    Missing,
    Given(T),
    Mistyped,
}

impl<'de, T: DeserializeOwned> Deserialize<'de> for Field<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match Value::deserialize(d)? {
            Value::Null => Field::Missing,
            v => T::deserialize(v).map_or(Field::Mistyped, Field::Given),
        })
    }
}

impl Field<String> {
    /// The value as a non-empty string: required, or optional (missing is `None`).
    fn text(&self, field: &str, required: bool) -> Result<Option<&str>, RlsError> {
        match self {
            Field::Missing if !required => Ok(None),
            Field::Given(s) if !s.is_empty() => Ok(Some(s)),
            _ => Err(RlsError::Invalid(format!(
                "{field}: expected a non-empty string"
            ))),
        }
    }
}

/// `POST /api/rls/policies`: a policy to create (ENABLE ROW LEVEL SECURITY and CREATE POLICY).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreatePolicy {
    /// The project.
    #[serde(default)]
    #[schema(value_type = String, required = true)]
    pub project_id: Field<String>,
    /// The table's schema (default `public`).
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub schema: Field<String>,
    #[serde(default)]
    #[schema(value_type = String, required = true)]
    pub table: Field<String>,
    /// The policy's name, unique on its table.
    #[serde(default)]
    #[schema(value_type = String, required = true)]
    pub name: Field<String>,
    /// ALL, SELECT, INSERT, UPDATE or DELETE.
    #[serde(default)]
    #[schema(value_type = Command, required = true)]
    pub command: Field<String>,
    /// The `USING` expression, e.g. `user_id = auth.uid()` (for INSERT: its `WITH CHECK`).
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub using: Field<String>,
    /// The `WITH CHECK` expression (not for SELECT and DELETE).
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub check: Field<String>,
}

/// `PATCH /api/rls/policies`: the dashboard's toggle.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TogglePolicy {
    /// The project.
    #[serde(default)]
    #[schema(value_type = String, required = true)]
    pub project_id: Field<String>,
    /// The table's schema (default `public`).
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub schema: Field<String>,
    #[serde(default)]
    #[schema(value_type = String, required = true)]
    pub table: Field<String>,
    #[serde(default)]
    #[schema(value_type = String, required = true)]
    pub name: Field<String>,
    #[serde(default)]
    #[schema(value_type = bool, required = true)]
    pub enabled: Field<bool>,
}

/// A table with its row-level security state and its policies.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TablePolicies {
    pub schema: String,
    pub table: String,
    pub rls_enabled: bool,
    pub rls_forced: bool,
    pub policies: Vec<Policy>,
}

/// A policy as the list shows it: the expressions as given, unless they were changed through
/// SQL since (then as PostgreSQL prints them).
#[derive(Debug, Serialize, ToSchema)]
pub struct Policy {
    pub name: String,
    pub command: Command,
    pub using: Option<String>,
    pub check: Option<String>,
    /// `false`: kept in PostgreSQL but applied to no one (see the module docs).
    pub enabled: bool,
}

/// A policy and its table, as created or toggled.
#[derive(Debug, Serialize, ToSchema)]
pub struct TablePolicy {
    pub schema: String,
    pub table: String,
    #[serde(flatten)]
    pub policy: Policy,
}

/// The `schema` (optional), `table` and `name` that name a policy in a request body.
fn policy_ref(
    schema: &Field<String>,
    table: &Field<String>,
    name: &Field<String>,
) -> Result<(TableRef, String), RlsError> {
    let table = TableRef::new(
        schema.text("schema", false)?,
        table.text("table", true)?.expect("required"),
    )?;
    let name = identifier(name.text("name", true)?.expect("required"), "name")?;
    Ok((table, name.to_string()))
}

/// A PostgreSQL identifier named by the caller (no truncation: at most 63 bytes).
fn identifier<'a>(value: &'a str, field: &str) -> Result<&'a str, RlsError> {
    if value.is_empty() || value.len() > 63 || value.contains('\0') {
        return Err(RlsError::Invalid(format!(
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
    fn new(schema: Option<&str>, table: &str) -> Result<TableRef, RlsError> {
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
    command: Command,
    using: Option<String>,
    check: Option<String>,
    enabled: bool,
    roles: Vec<String>,
    note: Option<PolicyNote>,
}

impl PolicyInfo {
    fn view(&self) -> Policy {
        // The expressions as given, unless they were changed through SQL since.
        let (using, check) = match &self.note {
            Some(n) if n.pg_using == self.using && n.pg_check == self.check => {
                (n.using.clone(), n.check.clone())
            }
            _ => (self.using.clone(), self.check.clone()),
        };
        Policy {
            name: self.name.clone(),
            command: self.command,
            using,
            check,
            enabled: self.enabled,
        }
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
fn policy_error(e: &DbError, what: &str) -> RlsError {
    let mut message = format!("{what}: {}", e.message);
    if let Some(detail) = &e.detail {
        message.push_str(&format!(" ({detail})"));
    }
    if let Some(hint) = &e.hint {
        message.push_str(&format!(" Hint: {hint}"));
    }
    match e.code.as_str() {
        "42710" => RlsError::Exists(message),
        "42704" => RlsError::NotFound(message),
        "42501" => RlsError::PermissionDenied(message),
        code => RlsError::Refused {
            message,
            sqlstate: code.to_string(),
        },
    }
}

/// The policy API over the project's SQL connections (as the owner role for changes).
pub struct Policies {
    sql: Arc<Sql>,
}

impl Policies {
    pub fn new(sql: Arc<Sql>) -> Policies {
        Policies { sql }
    }

    /// Every table with its RLS state and policies, read as the caller's role.
    pub async fn list(&self, access: &Access) -> Result<Vec<TablePolicies>, RlsError> {
        let mut conn = self.sql.connection(&access.project, access.db_role).await?;
        let rows = read_catalog(&mut conn, &access.project.id, None).await;
        release(conn);
        let mut tables: Vec<TablePolicies> = Vec::new();
        for row in rows? {
            let same = tables
                .last()
                .is_some_and(|t| t.schema == row.schema && t.table == row.table);
            if !same {
                tables.push(TablePolicies {
                    schema: row.schema,
                    table: row.table,
                    rls_enabled: row.rls_enabled,
                    rls_forced: row.rls_forced,
                    policies: Vec::new(),
                });
            }
            if let Some(p) = &row.policy {
                let entry = tables.last_mut().expect("pushed above");
                entry.policies.push(p.view());
            }
        }
        Ok(tables)
    }

    /// ENABLE ROW LEVEL SECURITY and CREATE POLICY, one transaction. The caller checked that
    /// `access` may manage policies.
    pub async fn create(
        &self,
        access: &Access,
        body: &CreatePolicy,
    ) -> Result<TablePolicy, RlsError> {
        let (table, name) = policy_ref(&body.schema, &body.table, &body.name)?;
        // A new name, shown to every admin (the dashboard's policy list): as other names a
        // caller chooses (red team rt13: `pol\u{202E}icy` was accepted). Existing policies,
        // made by SQL, are still named as they are by toggle and delete.
        if crate::text::has_deceptive(&name) {
            return Err(RlsError::Invalid(format!(
                "name: without {}",
                crate::text::DECEPTIVE_CHARACTERS
            )));
        }
        let command_text = body.command.text("command", true)?.expect("required");
        let command = Command::parse(command_text).ok_or_else(|| {
            RlsError::Invalid("command: expected one of ALL, SELECT, INSERT, UPDATE, DELETE".into())
        })?;
        let using = body.using.text("using", command != Command::Insert)?;
        let check = body.check.text("check", false)?;
        // PostgreSQL's rules: INSERT has only WITH CHECK, SELECT and DELETE only USING.
        let (using, check) = match command {
            Command::Insert => match (using, check) {
                (Some(_), Some(_)) => {
                    return Err(RlsError::Invalid(
                        "check: an INSERT policy has one expression (WITH CHECK); give it as \
                         `using` or `check`, not both"
                            .into(),
                    ))
                }
                (Some(e), None) => (None, Some(Expression::parse(e, "using")?)),
                (None, Some(e)) => (None, Some(Expression::parse(e, "check")?)),
                (None, None) => {
                    return Err(RlsError::Invalid(
                        "using: expected a non-empty string".into(),
                    ))
                }
            },
            Command::Select | Command::Delete if check.is_some() => {
                return Err(RlsError::Invalid(format!(
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
        Ok(policy)
    }

    /// The dashboard's toggle (see the module docs). The caller checked that `access` may
    /// manage policies.
    pub async fn toggle(
        &self,
        access: &Access,
        body: &TogglePolicy,
    ) -> Result<TablePolicy, RlsError> {
        let (table, name) = policy_ref(&body.schema, &body.table, &body.name)?;
        let Field::Given(enabled) = body.enabled else {
            return Err(RlsError::Invalid("enabled: expected true or false".into()));
        };
        let policy = self
            .policy_ddl(access, &table, &name, Vec::new(), None, enabled)
            .await?;
        tracing::info!(project_id = %access.project.id, table = %table.display(), policy = %name, enabled, "policy toggled");
        Ok(policy)
    }

    /// DROP POLICY. The caller checked that `access` may manage policies.
    pub async fn delete(
        &self,
        access: &Access,
        schema: Option<&str>,
        table: &str,
        name: &str,
    ) -> Result<(), RlsError> {
        let table = TableRef::new(schema, table)?;
        let name = identifier(name, "name")?;
        let mut conn = self.sql.connection(&access.project, DbRole::Owner).await?;
        let outcome = async {
            let rows = read_catalog(&mut conn, &access.project.id, Some(&table)).await?;
            check_policy_exists(&rows, &table, name)?;
            let drop = format!("DROP POLICY {} ON {}", quote_ident(name), table.sql());
            match conn.query_oneshot(&drop, &[], 0).await {
                Err(WireError::Db(e)) if !e.is_fatal() => Err(policy_error(&e, "DROP POLICY")),
                other => Ok(other.map(|_| ())?),
            }
        }
        .await;
        release(conn);
        outcome?;
        tracing::info!(project_id = %access.project.id, table = %table.display(), policy = %name, "policy deleted");
        Ok(())
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
    ) -> Result<TablePolicy, RlsError> {
        let mut conn = self.sql.connection(&access.project, DbRole::Owner).await?;
        let outcome = async {
            // `standard_conforming_strings` is what the expression check assumed.
            conn.simple_query("BEGIN; SET LOCAL standard_conforming_strings = on", 0)
                .await?;
            let result = policy_ddl_in_transaction(
                &mut conn,
                &access.project.id,
                table,
                name,
                statements,
                note,
                enabled,
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
        release(conn);
        outcome
    }
}

async fn policy_ddl_in_transaction(
    conn: &mut Connection,
    project_id: &str,
    table: &TableRef,
    name: &str,
    statements: Vec<String>,
    note: Option<PolicyNote>,
    enabled: bool,
) -> Result<TablePolicy, RlsError> {
    let rows = read_catalog(conn, project_id, Some(table)).await?;
    if rows.is_empty() {
        return Err(RlsError::NotFound(format!(
            "Table \"{}\" does not exist.",
            table.display()
        )));
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
                return Err(policy_error(&e, &what));
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
    Ok(TablePolicy {
        schema: table.schema.clone(),
        table: table.table.clone(),
        policy: policy.view(),
    })
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
) -> Result<&'a PolicyInfo, RlsError> {
    if rows.is_empty() {
        return Err(RlsError::NotFound(format!(
            "Table \"{}\" does not exist.",
            table.display()
        )));
    }
    rows.iter()
        .filter_map(|r| r.policy.as_ref())
        .find(|p| p.name == name)
        .ok_or_else(|| {
            RlsError::NotFound(format!(
                "Policy \"{name}\" does not exist on table \"{}\".",
                table.display()
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_bodies_refuse_unknown_fields_and_name_mistyped_ones() {
        let unknown = serde_json::from_str::<CreatePolicy>(
            r#"{"projectId": "p", "table": "posts", "name": "own", "command": "ALL", "usng": "true"}"#,
        );
        assert!(unknown
            .unwrap_err()
            .to_string()
            .contains("unknown field `usng`"));

        let body: TogglePolicy = serde_json::from_str(
            r#"{"projectId": "p", "table": 3, "name": "own", "enabled": "yes"}"#,
        )
        .unwrap();
        assert!(matches!(body.table, Field::Mistyped));
        assert!(matches!(body.enabled, Field::Mistyped));
        assert!(matches!(body.schema, Field::Missing));
        match policy_ref(&body.schema, &body.table, &body.name) {
            Err(RlsError::Invalid(m)) => assert!(m.starts_with("table: "), "{m}"),
            Err(e) => panic!("expected a refusal naming table, got {e:?}"),
            Ok(_) => panic!("a numeric table name was accepted"),
        }
    }
}
