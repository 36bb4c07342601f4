//! Repairs and bulk removals, outside any request: the start-up sweep that finishes what a
//! crash interrupted, the one-time move of objects an older version stored under encoded keys,
//! and the removal of a deleted project's objects. A server runs the first two once at start-up
//! before serving (a CLI command never does: a running server may be mid-upload).

use chrono::Utc;

use super::upload::STAGING;
use super::{Storage, StorageError};
use crate::control;

/// Reservations and staged objects older than this are abandoned uploads.
const ABANDONED_AFTER_SECS: i64 = 3600;

impl Storage {
    /// Forgets what downloads kept of a deleted project's files (its rows are gone: nothing
    /// of it may be served from memory while its objects are being deleted).
    pub fn forget_project(&self, project_id: &str) {
        self.served.forget_under(&format!("{project_id}/"));
    }

    /// Removes every object of a deleted project (its rows go with the project's).
    pub async fn delete_project_objects(&self, project_id: &str) {
        match self.backend.delete_prefix(project_id).await {
            Ok(n) => tracing::info!(project_id, objects = n, "project storage deleted"),
            Err(e) => tracing::warn!(project_id, error = %e, "deleting the project's objects"),
        }
    }

    /// Moves objects that versions before this one stored under object_store's encoded form
    /// of their key to the key itself (see [`super::Backend::migrate_legacy`]): once, at
    /// start-up, before the sweep and before any request, so that nothing at run time looks for
    /// an object anywhere but under its key. An encoded path that is another file's key is left
    /// alone (that object may be the other file's). Returns how many objects moved.
    pub async fn migrate_legacy_objects(&self) -> Result<usize, StorageError> {
        let client = self.control.get().await?;
        let keys: std::collections::HashSet<String> = control::files::all_keys(&client)
            .await?
            .into_iter()
            .collect();
        drop(client);
        let mut moved = 0;
        for key in &keys {
            match self.backend.migrate_legacy(key, |k| keys.contains(k)).await {
                Ok(true) => moved += 1,
                Ok(false) => {}
                Err(e) => tracing::warn!(key, error = %e, "moving an object to its key"),
            }
        }
        if moved > 0 {
            tracing::info!(
                objects = moved,
                "objects of an older version moved to their keys"
            );
        }
        Ok(moved)
    }

    /// Finishes what a crash interrupted: marked deletes, abandoned reservations and staged
    /// uploads older than an hour.
    pub async fn sweep(&self) -> Result<(), StorageError> {
        let client = self.control.get().await?;
        let cutoff = Utc::now() - chrono::Duration::seconds(ABANDONED_AFTER_SECS);
        // Uploads whose object was moved into place but whose final update was lost (it is
        // not waited for, control::files::record): the staged object is gone and the object
        // at the key has the reserved size. Any other reservation is an upload that never
        // got that far (or is still running on another node): left to the rules below.
        for p in control::files::pending(&client).await? {
            let staged_gone = self.backend.object_size(&p.staged).await?.is_none();
            if staged_gone && self.backend.object_size(&p.s3_key).await? == Some(p.size as u64) {
                tracing::info!(
                    file = p.id,
                    key = p.s3_key,
                    "finishing an upload a crash interrupted after its object was in place"
                );
                control::files::complete(&client, &p.id, &p.staged).await?;
            }
        }
        for (id, key) in control::files::marked_for_deletion(&client).await? {
            if self.backend.delete(&key).await.is_ok() {
                control::files::delete(&client, &id).await?;
            }
        }
        for (id, key) in control::files::abandoned(&client, cutoff).await? {
            if self.backend.delete(&key).await.is_ok() {
                control::files::delete_abandoned(&client, &id).await?;
            }
        }
        control::files::release_abandoned(&client, cutoff).await?;
        self.sweep_staged().await?;
        Ok(())
    }

    /// Removes staged uploads untouched for an hour: what a killed process left (red team rt5:
    /// staged files of uploads cut by kill -9 stayed until a restart an hour later). Run at
    /// start-up and then every `storage_staged_sweep_secs` by the server. Safe beside uploads
    /// in progress: a staged local file's modification time moves with every write, and a
    /// staged S3 object exists only between its upload's end and its move into place; an
    /// upload that wrote nothing for an hour fails at its move (nothing is listed for it).
    /// Reservations are left to the start-up sweep: theirs is the time of their creation, and
    /// a long upload may outlast an hour.
    pub async fn sweep_staged(&self) -> Result<usize, StorageError> {
        let cutoff = Utc::now() - chrono::Duration::seconds(ABANDONED_AFTER_SECS);
        let mut removed = 0;
        for key in self.backend.list_older_than(STAGING, cutoff).await? {
            if self.backend.delete(&key).await.is_ok() {
                removed += 1;
            }
        }
        if removed > 0 {
            tracing::info!(removed, "staged uploads nobody writes any more removed");
        }
        Ok(removed)
    }
}
