//! All SQL about stored workflow definitions (`workflow_definitions`, migration 0008).

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{FromRow, PgPool};

/// Announced when a version is stored or deleted, so every instance loads it at once.
pub const CHANGED_CHANNEL: &str = "sagaflow_definitions";

/// One stored version.
#[derive(Debug, Clone, FromRow)]
pub struct StoredRow {
    /// The workflow's name.
    pub name: String,
    /// The version.
    pub version: i32,
    /// The definition, as checked and normalized.
    pub definition: Value,
    /// When it was stored.
    pub created_at: DateTime<Utc>,
}

/// A version with how many unfinished runs use it.
#[derive(Debug, Clone, FromRow)]
pub struct VersionRow {
    /// The version.
    pub version: i32,
    /// When it was stored.
    pub created_at: DateTime<Utc>,
    /// Its runs that are not finished.
    pub unfinished_runs: i64,
}

/// Stores `definition` unless the newest version has the same content: returns the version,
/// whether it is new, and when it was stored. Versions of one name are assigned one at a time.
pub async fn upsert(
    pool: &PgPool,
    name: &str,
    hash: &str,
    definition: &Value,
) -> Result<(i32, bool, DateTime<Utc>), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('sagaflow.definition:' || $1))")
        .bind(name)
        .execute(&mut *tx)
        .await?;
    let newest: Option<(i32, String, DateTime<Utc>)> = sqlx::query_as(
        "SELECT version, content_hash, created_at FROM workflow_definitions WHERE name = $1
         ORDER BY version DESC LIMIT 1",
    )
    .bind(name)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some((version, stored, created_at)) = &newest
        && stored == hash
    {
        return Ok((*version, false, *created_at));
    }
    // A version number is never reused, even after its definition was deleted: runs and
    // recorded plans of the old one keep it.
    let highest_plan: i32 =
        sqlx::query_scalar("SELECT coalesce(max(version), 0) FROM workflow_plans WHERE workflow = $1")
            .bind(name)
            .fetch_one(&mut *tx)
            .await?;
    let version = newest.map_or(0, |(v, _, _)| v).max(highest_plan) + 1;
    let created_at: DateTime<Utc> = sqlx::query_scalar(
        "INSERT INTO workflow_definitions (name, version, content_hash, definition) VALUES ($1, $2, $3, $4)
         RETURNING created_at",
    )
    .bind(name)
    .bind(version)
    .bind(hash)
    .bind(definition)
    .fetch_one(&mut *tx)
    .await?;
    notify_changed(&mut tx, name).await?;
    tx.commit().await?;
    Ok((version, true, created_at))
}

/// One version (the newest when `version` is `None`).
pub async fn get(pool: &PgPool, name: &str, version: Option<i32>) -> Result<Option<StoredRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT name, version, definition, created_at FROM workflow_definitions
         WHERE name = $1 AND ($2::int4 IS NULL OR version = $2)
         ORDER BY version DESC LIMIT 1",
    )
    .bind(name)
    .bind(version)
    .fetch_optional(pool)
    .await
}

/// Every stored version of every definition, by name then version.
pub async fn all(pool: &PgPool) -> Result<Vec<StoredRow>, sqlx::Error> {
    sqlx::query_as("SELECT name, version, definition, created_at FROM workflow_definitions ORDER BY name, version")
        .fetch_all(pool)
        .await
}

/// The versions of `name`, newest first, with their unfinished runs.
pub async fn versions(pool: &PgPool, name: &str) -> Result<Vec<VersionRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT d.version, d.created_at,
                (SELECT count(*) FROM runs r
                 WHERE r.workflow = d.name AND r.workflow_version = d.version
                   AND run_status_is_unfinished(r.status)) AS unfinished_runs
         FROM workflow_definitions d WHERE d.name = $1 ORDER BY d.version DESC",
    )
    .bind(name)
    .fetch_all(pool)
    .await
}

/// What [`delete`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deleted {
    /// The version is gone.
    Deleted,
    /// No such version.
    NotFound,
    /// Refused: this many unfinished runs use it.
    InUse(i64),
}

/// Deletes a version unless unfinished runs use it.
pub async fn delete(pool: &PgPool, name: &str, version: i32) -> Result<Deleted, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let found: Option<i32> =
        sqlx::query_scalar("SELECT version FROM workflow_definitions WHERE name = $1 AND version = $2 FOR UPDATE")
            .bind(name)
            .bind(version)
            .fetch_optional(&mut *tx)
            .await?;
    if found.is_none() {
        return Ok(Deleted::NotFound);
    }
    let unfinished: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM runs WHERE workflow = $1 AND workflow_version = $2 AND run_status_is_unfinished(status)",
    )
    .bind(name)
    .bind(version)
    .fetch_one(&mut *tx)
    .await?;
    if unfinished > 0 {
        return Ok(Deleted::InUse(unfinished));
    }
    sqlx::query("DELETE FROM workflow_definitions WHERE name = $1 AND version = $2")
        .bind(name)
        .bind(version)
        .execute(&mut *tx)
        .await?;
    notify_changed(&mut tx, name).await?;
    tx.commit().await?;
    Ok(Deleted::Deleted)
}

async fn notify_changed(conn: &mut sqlx::PgConnection, name: &str) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(CHANGED_CHANNEL)
        .bind(name)
        .execute(conn)
        .await?;
    Ok(())
}
