//! The per-project type registry: what the server knows of each project's user-defined types
//! (enums, domains, composites, their arrays), so that values render as PostgreSQL's `to_json`
//! renders them.
//!
//! ```text
//!  SQL API (result columns, inferred parameters) ─┐
//!                                                 ├─► learn_types(oids) ─► catalog query ─► TypeRegistry[project]
//!  change stream (Relation messages)  ────────────┘                                          │
//!        rows rendered by values::write_json ◄───────────────────────────────────────────────┘
//! ```
//! One registry per project, shared by the SQL API and the change stream: a type learned by
//! one is known to the other. Built-in types need no query; a user-defined type is looked up
//! once, then kept until the project is forgotten (suspension, deletion).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use fluxbase_replication::values::TypeRegistry;
use fluxbase_replication::wire::{Connection, WireError};

/// The registries of every project, created on first use.
#[derive(Default)]
pub struct TypeCatalog {
    projects: Mutex<HashMap<String, Arc<RwLock<TypeRegistry>>>>,
}

impl TypeCatalog {
    /// The project's registry, shared by the SQL API and the change stream.
    pub fn registry(&self, project_id: &str) -> Arc<RwLock<TypeRegistry>> {
        self.projects
            .lock()
            .expect("poisoned")
            .entry(project_id.to_string())
            .or_insert_with(|| Arc::new(RwLock::new(TypeRegistry::new())))
            .clone()
    }

    /// Drops what is known of a project's types.
    pub fn forget(&self, project_id: &str) {
        self.projects.lock().expect("poisoned").remove(project_id);
    }
}

/// Teaches `types` the user-defined types among `oids` by querying the catalog on `conn` until
/// nothing is missing (a composite's fields or an array's element may name further types).
/// Rows the registry cannot read are logged and left out: those types then render as text.
pub async fn learn_types(
    conn: &mut Connection,
    types: &RwLock<TypeRegistry>,
    oids: &[u32],
) -> Result<(), WireError> {
    for _ in 0..8 {
        let missing = types.read().expect("poisoned").missing(oids);
        if missing.is_empty() {
            return Ok(());
        }
        let outcome = conn
            .simple_query(&TypeRegistry::catalog_query(&missing), usize::MAX)
            .await?;
        let rows = outcome.last.map(|r| r.rows).unwrap_or_default();
        if let Err(e) = types.write().expect("poisoned").absorb(&rows) {
            tracing::warn!(error = %e, "could not learn types from the catalog");
            return Ok(());
        }
    }
    Ok(())
}

/// [`learn_types`] on a session to a project database opened only if some of `oids` are not
/// known, and closed again: for a change stream, whose relations name user-defined types
/// rarely (once per type and stream), so that a stream keeps no session of its own on the
/// cluster besides its walsender.
pub async fn learn_types_connecting(
    cfg: &fluxbase_replication::wire::ConnectConfig,
    types: &RwLock<TypeRegistry>,
    oids: &[u32],
) -> Result<(), WireError> {
    if types.read().expect("poisoned").missing(oids).is_empty() {
        return Ok(());
    }
    let mut conn = Connection::connect(cfg).await?;
    let learned = learn_types(&mut conn, types, oids).await;
    conn.close().await;
    learned
}
