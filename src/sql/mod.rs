//! `POST /api/execute-sql`: the caller's SQL, run as the project role of its scope.
//!
//! ```text
//!  request ─► Access (scope → role) ─► pool[(project, role)] ─► wire::Connection (text results)
//!                                                                   │ rows: text + type OID
//!                              response JSON ◄─ values::write_json ◄┘ (PostgreSQL's to_json rules)
//! ```
//! Without `params` the text goes through the simple query protocol, so a script of several
//! statements runs in one implicit transaction and answers with its last statement's result.
//! With `params` it is one statement through the extended protocol: PostgreSQL infers each
//! parameter's type and the JSON value is converted to that type's text input.
//!
//! Connections log in as `fx_<project>_<role>`: never a superuser, never a role that can
//! `SET ROLE` to a stronger one. After each request the connection is reset: `ROLLBACK` if a
//! transaction was left open, off the response path, then `auth.reset_session()` (what
//! `DISCARD ALL` resets but the statements the connection keeps prepared), which travels with
//! the next request's statement, in its transaction; one that cannot be reset is dropped. After
//! one statement that PostgreSQL answered with a single plain CommandComplete (see
//! [`Checkout`]), the reset is given the routine epoch the connection last proved and skips its
//! LISTEN/PREPARE/held-cursor checks while that epoch stands
//! (sql/project/0014_session_reset_epoch.sql). A
//! statement with `params` that PostgreSQL has seen in this project before runs prepared under
//! a name of its own on the connection (Bind + Execute only). A statement that outlives `statement_timeout` (which the caller could lower or
//! disable with `SET`) is cancelled by the server side guard here as well.
//!
//! One job per file:
//! - [`pool`]: connections per (project, role) within the cluster's budget, checkout and reset;
//! - [`run`]: a request's statement(s) on a checked-out connection, parameters, cancellation;
//! - [`render`]: the answer as JSON text, written straight from PostgreSQL's text values;
//! - [`building`]: the memory of an answer while it is built, reserved in steps (both engines);
//! - [`shares`]: the connections one account's projects hold together (both engines).
//!
//! The type registry the rendering reads is [`crate::catalog`], shared with the change stream;
//! the request's identity (`auth.uid()`) is [`crate::rls::identity`].

pub mod building;
pub mod memory;
mod pool;
mod render;
mod run;
pub mod shares;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use fluxbase_replication::values::TypeRegistry;
use serde::Deserialize;
use serde_json::Value;

use crate::catalog::TypeCatalog;
use crate::config::Config;
use crate::db::ClusterTarget;
use crate::metrics::Metrics;
use crate::rls::Identities;
use crate::secrets::Secrets;

pub use building::{AnswerMemory, AnswerText};
pub(crate) use pool::permit_within_share;
pub use pool::{own_connections, release, Checkout, PoolFailure, PooledConnection, LOGIN_BOUND};
pub use render::SqlResponse;

/// The body of `POST /api/execute-sql`. Fields it does not know are ignored: clients of the
/// guide's endpoint may send more (see docs/decisions.md).
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SqlRequest {
    pub project_id: String,
    /// The SQL: one statement, or a script of several without `params`.
    pub query: String,
    /// Values for `$1`, `$2`, …, converted to the types PostgreSQL infers.
    #[serde(default)]
    pub params: Option<Vec<Value>>,
    /// The end user a trusted backend acts for: `auth.uid()` in row-level security policies.
    /// Read as any JSON value and checked by the identity rules, so that a mistyped value is
    /// an error naming the field.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub auth_uid: Option<Value>,
    /// Run with a scope no stronger than the caller's own: `read`, `readwrite` or `admin` (the
    /// database role of a key of that scope). A developer or admin member running with `read` or
    /// `readwrite` may name any `authUid`: how the dashboard's SQL Editor tests row-level
    /// security as an end user.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub scope: Option<Value>,
    /// Fields this endpoint does not know: ignored (clients of the guide's endpoint may send
    /// more), but a near-miss of a field that narrows what runs (`Scope`, `auth_uid`, `role`)
    /// is refused rather than silently run with the caller's full role ([`SqlRequest::misspelt`]).
    #[serde(flatten)]
    #[schema(ignore)]
    pub other: serde_json::Map<String, Value>,
}

impl SqlRequest {
    /// An unknown field that looks like one of ours, and the one it looks like: the same but for
    /// case, `_`, `-` and surrounding spaces, one typo away (an edit or a swap of neighbours), or
    /// a word that means the same (`role`, `readOnly` for `scope`).
    pub fn misspelt(&self) -> Option<(&str, &'static str)> {
        const OURS: [(&str, &str); 3] = [
            ("scope", "scope"),
            ("authuid", "authUid"),
            ("params", "params"),
        ];
        self.other.keys().find_map(|k| {
            let plain: String = k
                .trim()
                .chars()
                .filter(|c| *c != '_' && *c != '-' && !c.is_whitespace())
                .flat_map(char::to_lowercase)
                .collect();
            let meant = match plain.as_str() {
                "scopes" | "role" | "dbrole" | "readonly" => Some("scope"),
                "authuserid" => Some("authUid"),
                "parameters" => Some("params"),
                _ => OURS
                    .iter()
                    .find(|(ours, _)| one_typo_apart(&plain, ours))
                    .map(|(_, meant)| *meant),
            }?;
            // The field itself (`scope`) was read above; only other spellings are near-misses.
            (k != meant).then_some((k.as_str(), meant))
        })
    }
}

/// Whether `a` and `b` are equal or one edit apart (insert, delete, replace, or swap of two
/// neighbouring characters).
fn one_typo_apart(a: &str, b: &str) -> bool {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    if a == b {
        return true;
    }
    match a.len() as isize - b.len() as isize {
        0 => {
            let diff: Vec<usize> = (0..a.len()).filter(|&i| a[i] != b[i]).collect();
            diff.len() == 1
                || (diff.len() == 2
                    && diff[1] == diff[0] + 1
                    && a[diff[0]] == b[diff[1]]
                    && a[diff[1]] == b[diff[0]])
        }
        1 | -1 => {
            let (long, short) = if a.len() > b.len() {
                (&a, &b)
            } else {
                (&b, &a)
            };
            let i = (0..short.len())
                .find(|&i| long[i] != short[i])
                .unwrap_or(short.len());
            long[i + 1..] == short[i..]
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn misspelt(field: &str) -> Option<&'static str> {
        let body = serde_json::json!({ "projectId": "p", "query": "q", field: "read" });
        let req: SqlRequest = serde_json::from_value(body).unwrap();
        req.misspelt().map(|(_, meant)| meant)
    }

    #[test]
    fn near_misses_of_the_narrowing_fields_are_caught_and_other_fields_are_not() {
        for (field, meant) in [
            ("Scope", "scope"),
            ("scpoe", "scope"),
            ("Scope ", "scope"),
            ("scop", "scope"),
            ("dbRole", "scope"),
            ("readOnly", "scope"),
            ("auth_uid", "authUid"),
            ("authUdi", "authUid"),
            ("param", "params"),
        ] {
            assert_eq!(misspelt(field), Some(meant), "{field}");
        }
        for field in ["scores", "requestTag", "userId", "query2x", "note"] {
            assert_eq!(misspelt(field), None, "{field}");
        }
    }
}

/// Why a request's SQL could not run (a statement PostgreSQL refused is an answer, not this).
#[derive(Debug, thiserror::Error)]
pub enum SqlError {
    /// A bounded resource stayed busy for the whole wait: the project's share, the server's
    /// connection budget, a role login under repair. The message names the limit.
    #[error("{0}")]
    Busy(String),
    /// The project's database could not be reached, or the connection was lost.
    #[error("the project database is unreachable: {0}")]
    Unavailable(String),
    /// PostgreSQL refused the server's own login as the project role.
    #[error("project role login failed: {0}")]
    Login(String),
    /// The control database (sizing the budget) or building a pool failed.
    #[error(transparent)]
    Control(#[from] anyhow::Error),
}

/// The SQL service: connection pools per (project, role), the statement caches and the type
/// registries, and the request identities set on its connections.
pub struct Sql {
    host: String,
    port: u16,
    pool_size: usize,
    statement_timeout: Duration,
    temp_file_limit_kb: u64,
    max_rows: usize,
    max_response_bytes: usize,
    pools: Arc<pool::PoolMap>,
    budget: Arc<pool::Budget>,
    /// Per project: requests that may hold a connection at once (and that number).
    shares: shares::KeyedShares,
    project_share: usize,
    /// Per account (all its projects together): requests that may hold a connection at once
    /// (`sql_account_connections`, see [`shares`]).
    accounts: shares::AccountShares,
    /// Cluster mode: `sql_project_connections` and `sql_account_connections` are bounds across
    /// the cluster, and this node's share of each is [`crate::cluster::per_node`] (see
    /// [`Sql::join_cluster`]).
    cluster: std::sync::OnceLock<Arc<crate::cluster::leadership::Leadership>>,
    queue_timeout: Duration,
    types: TypeCatalog,
    statements: Mutex<HashMap<String, Arc<run::StatementCache>>>,
    /// Sizes the budget from the cluster's settings (see [`pool`]).
    control: deadpool_postgres::Pool,
    secrets: Secrets,
    identities: Identities,
    metrics: Arc<Metrics>,
    /// Admin sessions for the role repairs of new connections (see
    /// [`crate::projects::RoleLogin`]): never the control pool that serves requests.
    pub repairs: deadpool_postgres::Pool,
    /// The tenant backends' memory, watched from outside PostgreSQL ([`memory`]).
    pub memory: Arc<memory::BackendMemory>,
}

impl Sql {
    pub fn new(
        config: &Config,
        cluster: &ClusterTarget,
        control: deadpool_postgres::Pool,
        secrets: Secrets,
        metrics: Arc<Metrics>,
    ) -> Sql {
        let pools: Arc<pool::PoolMap> = Arc::default();
        let queue_timeout = Duration::from_millis(config.sql_queue_timeout_ms);
        let idle_timeout = Duration::from_secs(config.sql_idle_timeout_secs);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(pool::close_idle(Arc::downgrade(&pools), idle_timeout));
        }
        Sql {
            host: cluster.host.clone(),
            port: cluster.port,
            pool_size: config.pool_size,
            statement_timeout: config.statement_timeout(),
            temp_file_limit_kb: config.temp_file_limit_kb,
            max_rows: config.max_rows,
            max_response_bytes: config.max_response_bytes,
            budget: Arc::new(pool::Budget::new(
                config.sql_max_connections,
                pool::own_connections(config),
                queue_timeout,
                Arc::downgrade(&pools),
            )),
            repairs: pool::repair_pool(cluster),
            memory: memory::BackendMemory::new(
                config.sql_backend_memory_limit_mb,
                config.sql_backends_memory_total_mb,
                config.sql_backend_locks_limit,
                metrics.clone(),
            ),
            pools,
            shares: shares::KeyedShares::default(),
            project_share: config.sql_project_connections,
            accounts: shares::AccountShares::new(
                config.sql_account_connections,
                config.sql_project_connections,
            ),
            cluster: std::sync::OnceLock::new(),
            queue_timeout,
            types: TypeCatalog::default(),
            statements: Mutex::new(HashMap::new()),
            control,
            identities: Identities::new(secrets.clone(), cluster.clone(), metrics.clone()),
            secrets,
            metrics,
        }
    }

    /// The project's type registry, shared by the SQL API and the change stream.
    pub fn types(&self, project_id: &str) -> Arc<RwLock<TypeRegistry>> {
        self.types.registry(project_id)
    }

    /// How requests' identities are set on this service's connections (`auth.uid()`).
    pub fn identities(&self) -> &Identities {
        &self.identities
    }
}
