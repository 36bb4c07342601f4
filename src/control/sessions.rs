//! `fluxbase.sessions`: login sessions, the token kept only as a SHA-256 hash.

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use tokio_postgres::Error;

/// The session's user and when it expires.
pub async fn by_hash(
    db: &impl GenericClient,
    hash: &[u8],
) -> Result<Option<(String, DateTime<Utc>)>, Error> {
    Ok(db
        .query_opt(
            "SELECT user_id, expires_at FROM fluxbase.sessions WHERE token_hash = $1",
            &[&hash],
        )
        .await?
        .map(|r| (r.get(0), r.get(1))))
}

/// The token hashes of `user_id`'s sessions unexpired at `now` (a user has a few).
pub async fn live_of_user(
    db: &impl GenericClient,
    user_id: &str,
    now: DateTime<Utc>,
) -> Result<Vec<Vec<u8>>, Error> {
    Ok(db
        .query(
            "SELECT token_hash FROM fluxbase.sessions WHERE user_id = $1 AND expires_at > $2",
            &[&user_id, &now],
        )
        .await?
        .into_iter()
        .map(|r| r.get(0))
        .collect())
}

pub async fn insert(
    db: &impl GenericClient,
    hash: &[u8],
    user_id: &str,
    expires_at: DateTime<Utc>,
) -> Result<u64, Error> {
    db.execute(
        "INSERT INTO fluxbase.sessions (token_hash, user_id, expires_at) VALUES ($1, $2, $3)",
        &[&hash, &user_id, &expires_at],
    )
    .await
}

/// Forgets sessions that expired more than a week ago.
pub async fn purge_expired(db: &impl GenericClient) -> Result<u64, Error> {
    db.execute(
        "DELETE FROM fluxbase.sessions WHERE expires_at < now() - interval '7 days'",
        &[],
    )
    .await
}

pub async fn delete(db: &impl GenericClient, hash: &[u8]) -> Result<u64, Error> {
    db.execute(
        "DELETE FROM fluxbase.sessions WHERE token_hash = $1",
        &[&hash],
    )
    .await
}

/// Ends every session of a user; how many there were.
pub async fn delete_for_user(db: &impl GenericClient, user_id: &str) -> Result<u64, Error> {
    db.execute(
        "DELETE FROM fluxbase.sessions WHERE user_id = $1",
        &[&user_id],
    )
    .await
}
