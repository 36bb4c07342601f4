//! A project's buckets: created, renamed or re-limited, listed with what they hold, and
//! deleted once empty. A bucket is named by its UUID or its name wherever the API takes one
//! (the guide's upload form says `bucketId` accepts either).

use tokio_postgres::error::SqlState;

use super::{names, Storage, StorageError};
use crate::control;

pub use control::buckets::{Bucket, BucketChange, BucketUsage, NewBucket};

/// A positive size limit, and MIME types or patterns (`image/png`, `image/*`).
fn validate_limits(max: Option<i64>, mimes: Option<&[String]>) -> Result<(), StorageError> {
    if max.is_some_and(|m| m <= 0) {
        return Err(StorageError::InvalidMaxFileSize);
    }
    if let Some(list) = mimes {
        for m in list {
            let ok = m.split_once('/').is_some_and(|(t, s)| {
                !t.is_empty()
                    && !s.is_empty()
                    && (t.to_string() + s)
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"+-.*_".contains(&b))
            });
            if !ok {
                return Err(StorageError::InvalidMimePattern(m.clone()));
            }
        }
    }
    Ok(())
}

/// A taken name is a conflict naming it; other failures stay what they are.
fn exists_if_unique(e: tokio_postgres::Error, name: impl FnOnce() -> String) -> StorageError {
    if e.code() == Some(&SqlState::UNIQUE_VIOLATION) {
        StorageError::BucketExists(name())
    } else {
        e.into()
    }
}

impl Storage {
    /// Finds a bucket of the project by UUID or name (a UUID wins).
    pub async fn find_bucket(
        &self,
        project_id: &str,
        id_or_name: &str,
    ) -> Result<Bucket, StorageError> {
        let needle = id_or_name.trim().to_ascii_lowercase();
        let client = self.control.get().await?;
        control::buckets::find(&client, project_id, &needle)
            .await?
            .ok_or_else(|| StorageError::NoSuchBucket(id_or_name.to_string()))
    }

    /// The project's buckets by name, each with its listed files' count and bytes.
    pub async fn list_buckets(&self, project_id: &str) -> Result<Vec<BucketUsage>, StorageError> {
        let client = self.control.get().await?;
        Ok(control::buckets::list_with_usage(&client, project_id).await?)
    }

    pub async fn create_bucket(
        &self,
        project_id: &str,
        new: NewBucket,
    ) -> Result<Bucket, StorageError> {
        names::validate_bucket_name(&new.name)?;
        validate_limits(new.max_file_size, new.allowed_mime_types.as_deref())?;
        let client = self.control.get().await?;
        let bucket = control::buckets::insert(&client, project_id, &new)
            .await
            .map_err(|e| exists_if_unique(e, || new.name.clone()))?;
        tracing::info!(project_id, bucket = %bucket.id, name = %bucket.name, "bucket created");
        Ok(bucket)
    }

    /// Renames the bucket named `id_or_name`, or changes its visibility or limits.
    pub async fn change_bucket(
        &self,
        project_id: &str,
        id_or_name: &str,
        change: BucketChange,
    ) -> Result<Bucket, StorageError> {
        if let Some(name) = &change.name {
            names::validate_bucket_name(name)?;
        }
        validate_limits(
            change.max_file_size.flatten(),
            change
                .allowed_mime_types
                .as_ref()
                .and_then(|m| m.as_deref()),
        )?;
        let bucket = self.find_bucket(project_id, id_or_name).await?;
        let client = self.control.get().await?;
        let changed = control::buckets::update(&client, &bucket.id, &change)
            .await
            .map_err(|e| exists_if_unique(e, || change.name.clone().unwrap_or_default()));
        // Its visibility may have changed: downloads read their rows again.
        self.served.clear();
        changed
    }

    /// Deletes an empty bucket. The bucket row is locked first, so an upload reserving a file
    /// in it either commits before (and the bucket is not empty) or fails after (no bucket).
    pub async fn delete_bucket(
        &self,
        project_id: &str,
        id_or_name: &str,
    ) -> Result<Bucket, StorageError> {
        let bucket = self.find_bucket(project_id, id_or_name).await?;
        let mut client = self.control.get().await?;
        let tx = client.transaction().await?;
        if !control::buckets::lock(&tx, &bucket.id).await? {
            return Err(StorageError::NoSuchBucket(id_or_name.to_string()));
        }
        let files = control::files::count_in_bucket(&tx, &bucket.id).await?;
        if files > 0 {
            return Err(StorageError::BucketNotEmpty {
                name: bucket.name,
                files,
            });
        }
        control::buckets::delete(&tx, &bucket.id).await?;
        tx.commit().await?;
        tracing::info!(project_id, bucket = %bucket.id, "bucket deleted");
        Ok(bucket)
    }
}
