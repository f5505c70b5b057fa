//! All SQL of the dashboard's own state: its signing secret, its open sessions, and the login
//! forms already submitted. Ids and nonces are stored as SHA-256 digests, so a copy of these
//! tables opens no session.

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use sqlx::PgPool;

/// The signing secret shared by every instance on this database, created by the first one.
/// A conflict returns the stored secret unchanged (an update that changes nothing), also when
/// another instance committed it while this statement waited: `DO NOTHING` and a read in the
/// same statement would miss that row, its snapshot being older than the commit.
pub async fn secret(pool: &PgPool) -> Result<[u8; 32], sqlx::Error> {
    let fresh: [u8; 32] = rand::random();
    let stored: Vec<u8> = sqlx::query_scalar(
        "INSERT INTO dashboard_secret (secret) VALUES ($1)
         ON CONFLICT (singleton) DO UPDATE SET secret = dashboard_secret.secret
         RETURNING secret",
    )
    .bind(fresh.as_slice())
    .fetch_one(pool)
    .await?;
    stored
        .try_into()
        .map_err(|_| sqlx::Error::Protocol("the dashboard secret is not 32 bytes".into()))
}

fn digest(text: &str) -> Vec<u8> {
    Sha256::digest(text.as_bytes()).to_vec()
}

/// Records a new session (and drops a few expired ones, so the table stays small).
pub async fn open_session(
    pool: &PgPool,
    id: &str,
    operator: &str,
    expires_at: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "WITH expired AS (
             DELETE FROM dashboard_sessions WHERE id_hash IN (
                 SELECT id_hash FROM dashboard_sessions WHERE expires_at <= now() LIMIT 100)
         )
         INSERT INTO dashboard_sessions (id_hash, operator, expires_at) VALUES ($1, $2, $3)",
    )
    .bind(digest(id))
    .bind(operator)
    .bind(expires_at)
    .execute(pool)
    .await?;
    Ok(())
}

/// The operator and expiry of an open, unexpired session.
pub async fn session(pool: &PgPool, id: &str) -> Result<Option<(String, DateTime<Utc>)>, sqlx::Error> {
    sqlx::query_as("SELECT operator, expires_at FROM dashboard_sessions WHERE id_hash = $1 AND expires_at > now()")
        .bind(digest(id))
        .fetch_optional(pool)
        .await
}

/// Ends one session.
pub async fn close_session(pool: &PgPool, id: &str) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM dashboard_sessions WHERE id_hash = $1")
        .bind(digest(id))
        .execute(pool)
        .await?;
    Ok(())
}

/// Ends every session, on every instance; returns how many were open.
pub async fn close_all_sessions(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "WITH closed AS (DELETE FROM dashboard_sessions RETURNING expires_at)
         SELECT count(*) FILTER (WHERE expires_at > now()) FROM closed",
    )
    .fetch_one(pool)
    .await
}

/// Marks a login form's nonce as used; false when it had been used already.
pub async fn use_login_nonce(pool: &PgPool, nonce: &str, expires_at: DateTime<Utc>) -> Result<bool, sqlx::Error> {
    let inserted = sqlx::query(
        "WITH expired AS (
             DELETE FROM used_login_nonces WHERE nonce_hash IN (
                 SELECT nonce_hash FROM used_login_nonces WHERE expires_at <= now() LIMIT 100)
         )
         INSERT INTO used_login_nonces (nonce_hash, expires_at) VALUES ($1, $2)
         ON CONFLICT (nonce_hash) DO NOTHING",
    )
    .bind(digest(nonce))
    .bind(expires_at)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(inserted == 1)
}
