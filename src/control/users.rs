//! `fluxbase.users`: accounts, one per normalised email (a unique index on `lower(email)`).

use deadpool_postgres::GenericClient;
use tokio_postgres::{Error, Row};

pub struct UserRow {
    pub id: String,
    pub email: String,
    pub display_name: Option<String>,
}

impl From<&Row> for UserRow {
    fn from(r: &Row) -> Self {
        UserRow {
            id: r.get("id"),
            email: r.get("email"),
            display_name: r.get("display_name"),
        }
    }
}

/// Inserts an account; `false` when its email is taken.
pub async fn insert(
    db: &impl GenericClient,
    user: &UserRow,
    password_hash: &str,
) -> Result<bool, Error> {
    Ok(db
        .execute(
            "INSERT INTO fluxbase.users (id, email, display_name, password_hash)
             VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
            &[&user.id, &user.email, &user.display_name, &password_hash],
        )
        .await?
        > 0)
}

pub async fn get(db: &impl GenericClient, user_id: &str) -> Result<UserRow, Error> {
    let row = db
        .query_one(
            "SELECT id, email, display_name FROM fluxbase.users WHERE id = $1",
            &[&user_id],
        )
        .await?;
    Ok(UserRow::from(&row))
}

/// The account of `email` (any case) with its password hash.
pub async fn with_password_by_email(
    db: &impl GenericClient,
    email: &str,
) -> Result<Option<(UserRow, String)>, Error> {
    Ok(db
        .query_opt(
            "SELECT id, email, display_name, password_hash FROM fluxbase.users
             WHERE lower(email) = lower($1)",
            &[&email],
        )
        .await?
        .map(|r| (UserRow::from(&r), r.get("password_hash"))))
}

/// The account's own spelling of `email` (any case), if one is registered.
pub async fn stored_email(db: &impl GenericClient, email: &str) -> Result<Option<String>, Error> {
    Ok(db
        .query_opt(
            "SELECT email FROM fluxbase.users WHERE lower(email) = lower($1)",
            &[&email],
        )
        .await?
        .map(|r| r.get(0)))
}

/// Every account matching `email` (any case), locked for update: (id, email).
pub async fn lock_by_email(
    db: &impl GenericClient,
    email: &str,
) -> Result<Vec<(String, String)>, Error> {
    Ok(db
        .query(
            "SELECT id, email FROM fluxbase.users WHERE lower(email) = lower($1) FOR UPDATE",
            &[&email],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

pub async fn set_password(
    db: &impl GenericClient,
    user_id: &str,
    password_hash: &str,
) -> Result<u64, Error> {
    db.execute(
        "UPDATE fluxbase.users SET password_hash = $2 WHERE id = $1",
        &[&user_id, &password_hash],
    )
    .await
}
