//! `fluxbase.api_keys`: one row per key, its secret kept only as a SHA-256 hash; a revoked key
//! keeps its row (`revoked_at`).

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use tokio_postgres::Error;

use crate::auth::Scope;

/// A live key as the authentication path needs it.
pub struct KeyGrant {
    pub id: String,
    pub project_id: String,
    pub scope: Scope,
}

/// A live key as the key list shows it (never its secret).
pub struct KeyRow {
    pub id: String,
    pub name: String,
    pub scope: Scope,
    pub prefix: String,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
}

/// A live key's secret (its SHA-256) and scope, if `key_id` is a live key of `project_id`.
pub async fn live_secret(
    db: &impl GenericClient,
    project_id: &str,
    key_id: &str,
) -> Result<Option<(Vec<u8>, Scope)>, Error> {
    db.query_opt(
        "SELECT key_hash, scope FROM fluxbase.api_keys
         WHERE id = $1 AND project_id = $2 AND revoked_at IS NULL",
        &[&key_id, &project_id],
    )
    .await?
    .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
    .transpose()
}

/// The live key whose secret hashes to `hash`.
pub async fn live_by_hash(db: &impl GenericClient, hash: &[u8]) -> Result<Option<KeyGrant>, Error> {
    db.query_opt(
        "SELECT id, project_id, scope FROM fluxbase.api_keys
             WHERE key_hash = $1 AND revoked_at IS NULL",
        &[&hash],
    )
    .await?
    .map(|r| {
        Ok(KeyGrant {
            id: r.try_get(0)?,
            project_id: r.try_get(1)?,
            scope: r.try_get(2)?,
        })
    })
    .transpose()
}

pub async fn touch(db: &impl GenericClient, key_id: &str) -> Result<u64, Error> {
    db.execute(
        "UPDATE fluxbase.api_keys SET last_used_at = now() WHERE id = $1",
        &[&key_id],
    )
    .await
}

pub async fn list_live(db: &impl GenericClient, project_id: &str) -> Result<Vec<KeyRow>, Error> {
    db.query(
        "SELECT id, name, scope, prefix, created_at, last_used_at FROM fluxbase.api_keys
             WHERE project_id = $1 AND revoked_at IS NULL ORDER BY created_at, id",
        &[&project_id],
    )
    .await?
    .iter()
    .map(|r| {
        Ok(KeyRow {
            id: r.try_get(0)?,
            name: r.try_get(1)?,
            scope: r.try_get(2)?,
            prefix: r.try_get(3)?,
            created_at: r.try_get(4)?,
            last_used_at: r.try_get(5)?,
        })
    })
    .collect()
}

pub struct NewKeyRow<'a> {
    pub id: &'a str,
    pub project_id: &'a str,
    pub name: &'a str,
    pub scope: Scope,
    pub hash: &'a [u8],
    pub prefix: &'a str,
}

pub async fn insert(db: &impl GenericClient, key: &NewKeyRow<'_>) -> Result<u64, Error> {
    db.execute(
        "INSERT INTO fluxbase.api_keys (id, project_id, name, scope, key_hash, prefix)
         VALUES ($1, $2, $3, $4, $5, $6)",
        &[
            &key.id,
            &key.project_id,
            &key.name,
            &key.scope,
            &key.hash,
            &key.prefix,
        ],
    )
    .await
}

/// A live key's secret hash, to replace with [`replace_secret`]; `None`: no such live key.
pub async fn live_hash(
    db: &impl GenericClient,
    project_id: &str,
    key_id: &str,
) -> Result<Option<Vec<u8>>, Error> {
    db.query_opt(
        "SELECT key_hash FROM fluxbase.api_keys
         WHERE id = $1 AND project_id = $2 AND revoked_at IS NULL",
        &[&key_id, &project_id],
    )
    .await?
    .map(|r| r.try_get(0))
    .transpose()
}

/// Replaces a live key's secret if it is still `replaced` (so that of two rotations at once
/// one answers, not both with secrets of which one is already dead); its (name, scope), or
/// `None` when there is no such live key or its secret changed meanwhile.
pub async fn replace_secret(
    db: &impl GenericClient,
    project_id: &str,
    key_id: &str,
    replaced: &[u8],
    hash: &[u8],
    prefix: &str,
) -> Result<Option<(String, Scope)>, Error> {
    db.query_opt(
        "UPDATE fluxbase.api_keys SET key_hash = $3, prefix = $4, last_used_at = NULL,
                rotated_at = now()
             WHERE id = $1 AND project_id = $2 AND revoked_at IS NULL AND key_hash = $5
             RETURNING name, scope",
        &[&key_id, &project_id, &hash, &prefix, &replaced],
    )
    .await?
    .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
    .transpose()
}

/// Revokes a live key; whether there was one.
pub async fn revoke(
    db: &impl GenericClient,
    project_id: &str,
    key_id: &str,
) -> Result<bool, Error> {
    Ok(db
        .execute(
            "UPDATE fluxbase.api_keys SET revoked_at = now()
             WHERE id = $1 AND project_id = $2 AND revoked_at IS NULL",
            &[&key_id, &project_id],
        )
        .await?
        > 0)
}

/// The project's live (not revoked) keys, counted under a transaction-scoped lock of the
/// project's key creations (two creations at once cannot both pass a quota).
pub async fn lock_and_count_live(
    client: &impl GenericClient,
    project_id: &str,
) -> Result<i64, Error> {
    client
        .execute(
            "SELECT pg_advisory_xact_lock(hashtextextended('fluxbase.api_keys:' || $1, 0))",
            &[&project_id],
        )
        .await?;
    let row = client
        .query_one(
            "SELECT count(*) FROM fluxbase.api_keys WHERE project_id = $1 AND revoked_at IS NULL",
            &[&project_id],
        )
        .await?;
    Ok(row.get(0))
}
