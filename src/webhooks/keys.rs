//! What names a row, for the `row` ordering ([`super::payload::order_keys`]): the primary key
//! columns of the project's tables, read from the project database's catalog by the outbox
//! writer and cached until the next schema event in the stream.
//!
//! Fluxbase gives the tables it sees created `REPLICA IDENTITY FULL` (so that updates and deletes
//! carry the old row), and with it pgoutput flags every column as "key": the stream itself does
//! not say which columns are the primary key. The catalog does, as it is now, which may be
//! later than the change being stored when the stream lags; the cache is dropped at each schema
//! event the writer sees, so the changes between two schema events are keyed alike. A table the
//! catalog cannot be read for (the database unreachable) is ordered as one row (its table key)
//! until a retry 5 s later: less concurrency, never less order.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::db::ClusterTarget;

/// How a table's rows are named.
#[derive(Clone, Debug)]
pub enum RowNames {
    /// By these columns: the primary key (or the replica identity index).
    Key(Arc<[String]>),
    /// The table has no such key: by the whole row image.
    Image,
    /// Unknown (the catalog could not be read): the table is one row.
    Table,
}

/// The primary key columns of the project's tables, cached until [`KeyColumns::forget`].
pub(super) struct KeyColumns {
    cluster: Option<ClusterTarget>,
    project_id: String,
    client: Option<tokio_postgres::Client>,
    tables: HashMap<(String, String), (RowNames, Instant)>,
}

/// How long an unreadable catalog is not asked again.
const RETRY_AFTER: Duration = Duration::from_secs(5);

const KEY_SQL: &str = "
    SELECT a.attname::text
    FROM (SELECT i.indrelid, i.indkey::int2[] AS cols
          FROM pg_index i
          WHERE i.indrelid = to_regclass(quote_ident($1) || '.' || quote_ident($2))
            AND (i.indisprimary OR i.indisreplident)
          ORDER BY i.indisprimary DESC LIMIT 1) i
    CROSS JOIN LATERAL unnest(i.cols) WITH ORDINALITY AS k(attnum, ord)
    JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
    ORDER BY k.ord";

impl KeyColumns {
    /// `cluster`: where the project database is (`None`: every table is [`RowNames::Table`]).
    pub fn new(cluster: Option<ClusterTarget>, project_id: &str) -> KeyColumns {
        KeyColumns {
            cluster,
            project_id: project_id.to_string(),
            client: None,
            tables: HashMap::new(),
        }
    }

    /// A schema event: the catalog may have changed.
    pub fn forget(&mut self) {
        self.tables.clear();
    }

    /// How the rows of `schema.table` are named.
    pub async fn of(
        &mut self,
        control: &deadpool_postgres::Pool,
        schema: &str,
        table: &str,
    ) -> RowNames {
        let key = (schema.to_string(), table.to_string());
        if let Some((names, at)) = self.tables.get(&key) {
            if !matches!(names, RowNames::Table) || at.elapsed() < RETRY_AFTER {
                return names.clone();
            }
        }
        let names = match self.load(control, schema, table).await {
            Ok(names) => names,
            Err(e) => {
                tracing::warn!(project_id = %self.project_id, schema, table, error = %e,
                    "reading a table's primary key for webhook ordering; ordering the table as one row");
                self.client = None;
                RowNames::Table
            }
        };
        self.tables.insert(key, (names.clone(), Instant::now()));
        names
    }

    async fn load(
        &mut self,
        control: &deadpool_postgres::Pool,
        schema: &str,
        table: &str,
    ) -> anyhow::Result<RowNames> {
        let Some(cluster) = &self.cluster else {
            return Ok(RowNames::Table);
        };
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            let db_name: String = control
                .get()
                .await?
                .query_one(
                    "SELECT db_name FROM fluxbase.projects WHERE id = $1",
                    &[&self.project_id],
                )
                .await?
                .get(0);
            self.client = Some(
                tokio::time::timeout(Duration::from_secs(10), cluster.connect(&db_name))
                    .await
                    .map_err(|_| anyhow::anyhow!("connecting timed out"))??,
            );
        }
        let client = self.client.as_ref().expect("connected");
        let cols: Vec<String> = client
            .query(KEY_SQL, &[&schema, &table])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        Ok(if cols.is_empty() {
            RowNames::Image
        } else {
            RowNames::Key(cols.into())
        })
    }
}
