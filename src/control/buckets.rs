//! `fluxbase.storage_buckets`: a project's buckets (what they are for: [`crate::storage`]).
//! Names are unique per project (`UNIQUE (project_id, name)`): an insert or rename onto a taken
//! name fails with `unique_violation`, which the caller turns into its conflict.

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use tokio_postgres::{Error, Row};

/// A bucket row.
#[derive(Clone, Debug)]
pub struct Bucket {
    /// A UUID.
    pub id: String,
    pub name: String,
    pub is_public: bool,
    /// Bytes; `None`: only the server's upload limit applies.
    pub max_file_size: Option<i64>,
    /// MIME types or patterns (`image/*`); `None`: any type.
    pub allowed_mime_types: Option<Vec<String>>,
    pub created_at: DateTime<Utc>,
}

/// A bucket with what it holds: its listed files (stored, not being deleted) and their bytes.
#[derive(Clone, Debug)]
pub struct BucketUsage {
    pub bucket: Bucket,
    pub file_count: i64,
    pub size: i64,
}

/// The values of a new bucket.
#[derive(Clone, Debug)]
pub struct NewBucket {
    pub name: String,
    pub is_public: bool,
    pub max_file_size: Option<i64>,
    pub allowed_mime_types: Option<Vec<String>>,
}

/// What a bucket update changes; `None` keeps a value. The limits are `Some(None)` to remove
/// them.
#[derive(Clone, Debug, Default)]
pub struct BucketChange {
    pub name: Option<String>,
    pub is_public: Option<bool>,
    pub max_file_size: Option<Option<i64>>,
    pub allowed_mime_types: Option<Option<Vec<String>>>,
}

const COLUMNS: &str = "id::text, name, is_public, max_file_size, allowed_mime_types, created_at";

impl Bucket {
    /// A bucket from a row whose first columns are [`COLUMNS`].
    pub(crate) fn from_row(r: &Row) -> Bucket {
        Bucket {
            id: r.get(0),
            name: r.get(1),
            is_public: r.get(2),
            max_file_size: r.get(3),
            allowed_mime_types: r.get(4),
            created_at: r.get(5),
        }
    }
}

/// The project's bucket whose UUID or name is `needle` (lowercase); a UUID wins.
pub async fn find(
    client: &impl GenericClient,
    project_id: &str,
    needle: &str,
) -> Result<Option<Bucket>, Error> {
    let statement = client
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM fluxbase.storage_buckets
             WHERE project_id = $1 AND (id::text = $2 OR name = $2)
             ORDER BY (id::text = $2) DESC LIMIT 1"
        ))
        .await?;
    let row = client
        .query_opt(&statement, &[&project_id, &needle])
        .await?;
    Ok(row.map(|r| Bucket::from_row(&r)))
}

/// The project's buckets by name, each with its listed files' count and bytes.
pub async fn list_with_usage(
    client: &impl GenericClient,
    project_id: &str,
) -> Result<Vec<BucketUsage>, Error> {
    let rows = client
        .query(
            &format!(
                "SELECT {COLUMNS},
                   (SELECT count(*) FROM fluxbase.storage_files f
                     WHERE f.bucket_id = b.id AND f.size IS NOT NULL AND f.deleting_at IS NULL),
                   (SELECT coalesce(sum(size), 0)::bigint FROM fluxbase.storage_files f
                     WHERE f.bucket_id = b.id AND f.size IS NOT NULL AND f.deleting_at IS NULL)
                 FROM fluxbase.storage_buckets b WHERE project_id = $1 ORDER BY name"
            ),
            &[&project_id],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| BucketUsage {
            bucket: Bucket::from_row(r),
            file_count: r.get(6),
            size: r.get(7),
        })
        .collect())
}

pub async fn insert(
    client: &impl GenericClient,
    project_id: &str,
    new: &NewBucket,
) -> Result<Bucket, Error> {
    let row = client
        .query_one(
            &format!(
                "INSERT INTO fluxbase.storage_buckets
                   (project_id, name, is_public, max_file_size, allowed_mime_types)
                 VALUES ($1, $2, $3, $4, $5) RETURNING {COLUMNS}"
            ),
            &[
                &project_id,
                &new.name,
                &new.is_public,
                &new.max_file_size,
                &new.allowed_mime_types,
            ],
        )
        .await?;
    Ok(Bucket::from_row(&row))
}

pub async fn update(
    client: &impl GenericClient,
    id: &str,
    change: &BucketChange,
) -> Result<Bucket, Error> {
    let row = client
        .query_one(
            &format!(
                "UPDATE fluxbase.storage_buckets SET
                   name = coalesce($2, name),
                   is_public = coalesce($3, is_public),
                   max_file_size = CASE WHEN $4 THEN $5 ELSE max_file_size END,
                   allowed_mime_types = CASE WHEN $6 THEN $7 ELSE allowed_mime_types END
                 WHERE id = $1::text::uuid RETURNING {COLUMNS}"
            ),
            &[
                &id,
                &change.name,
                &change.is_public,
                &change.max_file_size.is_some(),
                &change.max_file_size.flatten(),
                &change.allowed_mime_types.is_some(),
                &change.allowed_mime_types.clone().flatten(),
            ],
        )
        .await?;
    Ok(Bucket::from_row(&row))
}

/// Locks the bucket's row until the transaction ends; whether it still exists.
pub async fn lock(client: &impl GenericClient, id: &str) -> Result<bool, Error> {
    let locked = client
        .query_opt(
            "SELECT 1 FROM fluxbase.storage_buckets WHERE id = $1::text::uuid FOR UPDATE",
            &[&id],
        )
        .await?;
    Ok(locked.is_some())
}

pub async fn delete(client: &impl GenericClient, id: &str) -> Result<(), Error> {
    client
        .execute(
            "DELETE FROM fluxbase.storage_buckets WHERE id = $1::text::uuid",
            &[&id],
        )
        .await?;
    Ok(())
}
