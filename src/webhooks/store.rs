//! All SQL of the webhooks: subscriptions, deliveries and the settings the triggers read
//! (`migrations/0014_webhooks.sql` writes the deliveries themselves, in the transaction of the
//! change they report).

use chrono::{DateTime, Utc};
use sqlx::{FromRow, PgConnection, PgPool};
use uuid::Uuid;

use super::{DeliveryStatus, NewSubscription, Subscription};

const SUBSCRIPTION_COLUMNS: &str = "name, url, events, workflows, secret_env, enabled, created_at, updated_at";
const DELIVERY_COLUMNS: &str = "id, webhook_id, subscription, event_type, run_id, status, attempts, next_attempt_at, \
     give_up_at, last_attempt_at, last_status, last_error, created_at, delivered_at";

/// A delivery as listed (without its body).
#[derive(Debug, Clone, FromRow, serde::Serialize, utoipa::ToSchema)]
pub struct Delivery {
    /// Its id (for redelivery).
    pub id: i64,
    /// The `webhook-id` header and the body's `id`, the same on every attempt.
    pub webhook_id: String,
    /// The subscription.
    pub subscription: String,
    /// `run.completed`, `event.customer.created`...
    pub event_type: String,
    /// The run it reports on, if any.
    pub run_id: Option<Uuid>,
    /// `pending`, `delivered` or `failed`.
    pub status: DeliveryStatus,
    /// Attempts made since it was written (or last redelivered).
    pub attempts: i32,
    /// When the next attempt may start (while pending).
    pub next_attempt_at: DateTime<Utc>,
    /// No attempt starts after this: it is marked failed.
    pub give_up_at: DateTime<Utc>,
    /// When the last attempt started.
    pub last_attempt_at: Option<DateTime<Utc>>,
    /// The HTTP status the receiver last answered, if it answered.
    pub last_status: Option<i32>,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
    /// When it was written (with the change it reports).
    pub created_at: DateTime<Utc>,
    /// When the receiver accepted it.
    pub delivered_at: Option<DateTime<Utc>>,
}

/// A delivery claimed for an attempt, with what sending it needs.
#[derive(Debug, Clone, FromRow)]
pub(crate) struct Claimed {
    pub(crate) id: i64,
    pub(crate) webhook_id: String,
    pub(crate) subscription: String,
    pub(crate) event_type: String,
    pub(crate) body: String,
    pub(crate) attempts: i32,
    pub(crate) url: String,
    pub(crate) secret_env: String,
}

/// Sets how long the triggers' new deliveries are retried.
pub(crate) async fn set_retry_window(pool: &PgPool, window: std::time::Duration) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE webhook_settings SET retry_window = $1 * interval '1 millisecond'")
        .bind(millis(window))
        .execute(pool)
        .await?;
    Ok(())
}

/// Every subscription, by name.
pub(crate) async fn list(pool: &PgPool) -> Result<Vec<Subscription>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {SUBSCRIPTION_COLUMNS} FROM webhook_subscriptions ORDER BY name"
    )))
    .fetch_all(pool)
    .await
}

/// One subscription.
pub(crate) async fn get<'e>(db: impl sqlx::PgExecutor<'e>, name: &str) -> Result<Option<Subscription>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {SUBSCRIPTION_COLUMNS} FROM webhook_subscriptions WHERE name = $1"
    )))
    .bind(name)
    .fetch_optional(db)
    .await
}

/// Inserts a subscription; `None` if the name is taken.
pub(crate) async fn insert(conn: &mut PgConnection, s: &NewSubscription) -> Result<Option<Subscription>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "INSERT INTO webhook_subscriptions (name, url, events, workflows, secret_env, enabled)
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (name) DO NOTHING
         RETURNING {SUBSCRIPTION_COLUMNS}"
    )))
    .bind(&s.name)
    .bind(&s.url)
    .bind(&s.events)
    .bind(&s.workflows)
    .bind(&s.secret_env)
    .bind(s.enabled)
    .fetch_optional(conn)
    .await
}

/// Creates or replaces a subscription; whether it was created.
pub(crate) async fn upsert(conn: &mut PgConnection, s: &NewSubscription) -> Result<(Subscription, bool), sqlx::Error> {
    #[derive(FromRow)]
    struct Row {
        #[sqlx(flatten)]
        subscription: Subscription,
        created: bool,
    }
    let row: Row = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "INSERT INTO webhook_subscriptions (name, url, events, workflows, secret_env, enabled)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (name) DO UPDATE SET url = EXCLUDED.url, events = EXCLUDED.events,
             workflows = EXCLUDED.workflows, secret_env = EXCLUDED.secret_env, enabled = EXCLUDED.enabled,
             updated_at = now()
         RETURNING {SUBSCRIPTION_COLUMNS}, (xmax = 0) AS created"
    )))
    .bind(&s.name)
    .bind(&s.url)
    .bind(&s.events)
    .bind(&s.workflows)
    .bind(&s.secret_env)
    .bind(s.enabled)
    .fetch_one(conn)
    .await?;
    Ok((row.subscription, row.created))
}

/// Deletes a subscription with its deliveries; whether it existed.
pub(crate) async fn delete(conn: &mut PgConnection, name: &str) -> Result<bool, sqlx::Error> {
    let done = sqlx::query("DELETE FROM webhook_subscriptions WHERE name = $1")
        .bind(name)
        .execute(conn)
        .await?;
    Ok(done.rows_affected() > 0)
}

/// The newest `limit` deliveries of a subscription, newest first, and how many it has.
pub(crate) async fn deliveries(pool: &PgPool, name: &str, limit: i64) -> Result<Vec<Delivery>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE subscription = $1 ORDER BY id DESC LIMIT $2"
    )))
    .bind(name)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// The newest `limit` deliveries of every subscription, newest first.
pub(crate) async fn recent_deliveries(pool: &PgPool, limit: i64) -> Result<Vec<Delivery>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries ORDER BY id DESC LIMIT $1"
    )))
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// Counts of deliveries by status (pending, delivered, failed).
pub(crate) async fn counts(pool: &PgPool) -> Result<(i64, i64, i64), sqlx::Error> {
    sqlx::query_as(
        "SELECT count(*) FILTER (WHERE status = 'pending'), count(*) FILTER (WHERE status = 'delivered'),
                count(*) FILTER (WHERE status = 'failed')
         FROM webhook_deliveries",
    )
    .fetch_one(pool)
    .await
}

/// One delivery.
pub(crate) async fn delivery<'e>(
    db: impl sqlx::PgExecutor<'e>,
    name: &str,
    id: i64,
) -> Result<Option<Delivery>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE subscription = $1 AND id = $2"
    )))
    .bind(name)
    .bind(id)
    .fetch_optional(db)
    .await
}

/// Makes a delivery due again at once, with a fresh retry window and backoff (its attempts
/// count from the redelivery; same `webhook-id`).
pub(crate) async fn redeliver(
    conn: &mut PgConnection,
    name: &str,
    id: i64,
    window: std::time::Duration,
) -> Result<Option<Delivery>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "UPDATE webhook_deliveries SET status = 'pending', delivered_at = NULL, attempts = 0,
             next_attempt_at = clock_timestamp(),
             give_up_at = clock_timestamp() + $3 * interval '1 millisecond'
         WHERE subscription = $1 AND id = $2
         RETURNING {DELIVERY_COLUMNS}"
    )))
    .bind(name)
    .bind(id)
    .bind(millis(window))
    .fetch_optional(conn)
    .await
}

/// Writes a test delivery (`webhook.test`) to one subscription, whatever its events, with its
/// first attempt under way (the caller makes it; the worker would only after `lease`).
pub(crate) async fn enqueue_test(
    conn: &mut PgConnection,
    name: &str,
    webhook_id: &str,
    body: &str,
    window: std::time::Duration,
    lease: std::time::Duration,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "INSERT INTO webhook_deliveries (webhook_id, subscription, event_type, body, give_up_at, attempts,
                                         last_attempt_at, next_attempt_at)
         VALUES ($2, $1, 'webhook.test', $3, clock_timestamp() + $4 * interval '1 millisecond', 1,
                 clock_timestamp(), clock_timestamp() + $5 * interval '1 millisecond')
         RETURNING id",
    )
    .bind(name)
    .bind(webhook_id)
    .bind(body)
    .bind(millis(window))
    .bind(millis(lease))
    .fetch_one(conn)
    .await
}

fn millis(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Claims up to `limit` due deliveries of enabled subscriptions for an attempt: oldest due
/// first, and none while an older delivery of the same run to the same subscription is still
/// pending (in order per run). The claim pushes the next attempt `lease` ahead, so a worker
/// that dies mid-attempt leaves it due again.
pub(crate) async fn claim(pool: &PgPool, limit: i64, lease: std::time::Duration) -> Result<Vec<Claimed>, sqlx::Error> {
    sqlx::query_as(
        "WITH due AS (
             SELECT d.id FROM webhook_deliveries d
             JOIN webhook_subscriptions s ON s.name = d.subscription AND s.enabled
             WHERE d.status = 'pending' AND d.next_attempt_at <= clock_timestamp()
               AND NOT EXISTS (SELECT 1 FROM webhook_deliveries e
                               WHERE e.subscription = d.subscription AND e.run_id = d.run_id
                                 AND e.status = 'pending' AND e.id < d.id)
             ORDER BY d.next_attempt_at
             LIMIT $1
             FOR UPDATE OF d SKIP LOCKED
         )
         UPDATE webhook_deliveries d SET attempts = d.attempts + 1, last_attempt_at = clock_timestamp(),
             next_attempt_at = clock_timestamp() + $2 * interval '1 millisecond'
         FROM due, webhook_subscriptions s
         WHERE d.id = due.id AND s.name = d.subscription
         RETURNING d.id, d.webhook_id, d.subscription, d.event_type, d.body, d.attempts,
                   s.url, s.secret_env",
    )
    .bind(limit)
    .bind(millis(lease))
    .fetch_all(pool)
    .await
}

/// Records an accepted attempt.
pub(crate) async fn delivered(pool: &PgPool, id: i64, status: u16) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE webhook_deliveries SET status = 'delivered', delivered_at = clock_timestamp(), last_status = $2,
             last_error = NULL
         WHERE id = $1 AND status = 'pending'",
    )
    .bind(id)
    .bind(i32::from(status))
    .execute(pool)
    .await?;
    Ok(())
}

/// Records a failed attempt: due again at `retry_at`, or failed for good when that is past
/// its window. Returns whether it failed for good.
pub(crate) async fn attempt_failed(
    pool: &PgPool,
    id: i64,
    status: Option<u16>,
    error: &str,
    retry_at: DateTime<Utc>,
) -> Result<bool, sqlx::Error> {
    let gave_up: Option<bool> = sqlx::query_scalar(
        "UPDATE webhook_deliveries SET last_status = $2, last_error = $3,
             status = CASE WHEN $4 > give_up_at THEN 'failed'::webhook_delivery_status ELSE status END,
             next_attempt_at = $4
         WHERE id = $1 AND status = 'pending'
         RETURNING status = 'failed'",
    )
    .bind(id)
    .bind(status.map(i32::from))
    .bind(error)
    .bind(retry_at)
    .fetch_optional(pool)
    .await?;
    Ok(gave_up.unwrap_or(false))
}

/// Writes `run.wait_overdue` deliveries for runs whose wait passed its deadline more than
/// `grace` ago and is still not ended (no worker picked it up), one per wait.
pub(crate) async fn enqueue_overdue(pool: &PgPool, grace: std::time::Duration) -> Result<(), sqlx::Error> {
    sqlx::query(
        "SELECT webhook_enqueue('run.wait_overdue', r.workflow, r.id,
                                jsonb_build_object('run', webhook_run_json(r) || jsonb_build_object('waiting',
                                    jsonb_build_object('kind', r.wait_kind, 'name', r.wait_name,
                                                       'attempt', r.wait_attempt, 'deadline', r.wait_deadline))),
                                r.id::text || ':' || r.wait_step || ':' || r.wait_attempt)
         FROM runs r
         WHERE r.wait_kind IS NOT NULL AND r.status = 'running'
           AND r.wait_deadline < clock_timestamp() - $1 * interval '1 millisecond'
           AND EXISTS (SELECT 1 FROM webhook_subscriptions s WHERE s.enabled AND 'run.wait_overdue' = ANY (s.events))",
    )
    .bind(millis(grace))
    .execute(pool)
    .await?;
    Ok(())
}
