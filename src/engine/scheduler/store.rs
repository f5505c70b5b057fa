//! All SQL of schedules: their definitions and firing state (`schedules`), the runs they
//! started (`schedule_fires`), and the channel that wakes schedulers when they change.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{FromRow, PgConnection, PgExecutor, PgPool};
use uuid::Uuid;

use super::{CatchUp, Origin, Overlap, ScheduleSpec};
use crate::engine::status::RunStatus;

/// The channel schedulers LISTEN on; the payload is the schedule's name. Schedules change
/// rarely, so a NOTIFY in the changing transaction costs nothing that matters.
pub const CHANNEL: &str = "sagaflow_schedules";

/// A schedule as stored.
#[derive(Debug, Clone, FromRow)]
pub struct ScheduleRow {
    /// Its name.
    pub name: String,
    /// The cron expression as written.
    pub expression: String,
    /// The IANA time zone of the expression.
    pub time_zone: String,
    /// The workflow each tick starts.
    pub workflow: String,
    /// The input of each run.
    pub input: Value,
    /// Whether ticks fire.
    pub enabled: bool,
    /// What a tick does while a run of the schedule is in flight.
    pub overlap: Overlap,
    /// Which missed ticks fire after a time with no instance running.
    pub catch_up: CatchUp,
    /// Where it was defined.
    pub origin: Origin,
    /// The next tick not yet handled (None while disabled, or if it never fires again).
    pub next_fire_at: Option<DateTime<Utc>>,
    /// The last tick that started a run.
    pub last_fire_at: Option<DateTime<Utc>>,
    /// The run it started (None once the retention sweep deleted it).
    pub last_run_id: Option<Uuid>,
    /// Why the last tick could not start a run, until one could.
    pub last_error: Option<String>,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When its definition or state last changed.
    pub updated_at: DateTime<Utc>,
}

const COLUMNS: &str = "name, expression, time_zone, workflow, input, enabled, overlap, catch_up, origin, \
     next_fire_at, last_fire_at, last_run_id, last_error, created_at, updated_at";

/// A run a schedule started, with the run's status now.
#[derive(Debug, Clone, FromRow)]
pub struct FireRow {
    /// The tick it was started for (for a fire-now: when the operator asked).
    pub tick: DateTime<Utc>,
    /// An operator's fire-now rather than a tick.
    pub manual: bool,
    /// The node that started it, or the operator.
    pub fired_by: String,
    /// When it was started.
    pub fired_at: DateTime<Utc>,
    /// The run.
    pub run_id: Uuid,
    /// Its status.
    pub status: RunStatus,
    /// When it finished, if it has.
    pub finished_at: Option<DateTime<Utc>>,
}

/// A schedule by name.
pub async fn get<'e>(db: impl PgExecutor<'e>, name: &str) -> Result<Option<ScheduleRow>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM schedules WHERE name = $1"
    )))
    .bind(name)
    .fetch_optional(db)
    .await
}

/// A schedule by name, locked until the transaction ends (changes, fire-now, and the
/// scheduler handling it exclude one another).
pub async fn get_for_update(conn: &mut PgConnection, name: &str) -> Result<Option<ScheduleRow>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM schedules WHERE name = $1 FOR UPDATE"
    )))
    .bind(name)
    .fetch_optional(conn)
    .await
}

/// Every schedule, by name.
pub async fn list(pool: &PgPool) -> Result<Vec<ScheduleRow>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM schedules ORDER BY name"
    )))
    .fetch_all(pool)
    .await
}

/// One page of schedules by name: those after `after` (a keyset cursor: the last name of the
/// previous page), whose name or workflow contains `contains` (case-insensitive), at most
/// `limit`. Walks the primary key in order, so a page costs the same on the last page as on
/// the first.
pub async fn list_page(
    pool: &PgPool,
    contains: Option<&str>,
    after: Option<&str>,
    limit: i64,
) -> Result<Vec<ScheduleRow>, sqlx::Error> {
    // strpos rather than LIKE: what operators type is text, not a pattern (`_` and `%` are
    // common in names).
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM schedules
         WHERE ($1::text IS NULL OR strpos(lower(name), lower($1)) > 0 OR strpos(lower(workflow), lower($1)) > 0)
           AND ($2::text IS NULL OR name > $2)
         ORDER BY name
         LIMIT $3"
    )))
    .bind(contains)
    .bind(after)
    .bind(limit.max(0))
    .fetch_all(pool)
    .await
}

/// How [`save`] treats an existing schedule of the same name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnConflict {
    /// Leave it alone and write nothing (the caller reports a duplicate).
    Keep,
    /// Replace its definition.
    Replace,
}

/// Writes a definition with its next tick; an existing schedule of that name is kept or
/// replaced (its firing history stays). Returns the row written, if any.
pub async fn save(
    conn: &mut PgConnection,
    spec: &ScheduleSpec,
    origin: Origin,
    next_fire_at: Option<DateTime<Utc>>,
    on_conflict: OnConflict,
) -> Result<Option<ScheduleRow>, sqlx::Error> {
    let conflict = match on_conflict {
        OnConflict::Keep => "DO NOTHING",
        OnConflict::Replace => {
            "DO UPDATE SET
             expression = EXCLUDED.expression, time_zone = EXCLUDED.time_zone, workflow = EXCLUDED.workflow,
             input = EXCLUDED.input, enabled = EXCLUDED.enabled, overlap = EXCLUDED.overlap,
             catch_up = EXCLUDED.catch_up, origin = EXCLUDED.origin, next_fire_at = EXCLUDED.next_fire_at,
             last_error = NULL, updated_at = now()"
        }
    };
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "INSERT INTO schedules (name, expression, time_zone, workflow, input, enabled, overlap, catch_up, origin,
                                next_fire_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
         ON CONFLICT (name) {conflict}
         RETURNING {COLUMNS}"
    )))
    .bind(&spec.name)
    .bind(spec.expression.trim())
    .bind(spec.time_zone.trim())
    .bind(&spec.workflow)
    .bind(&spec.input)
    .bind(spec.enabled)
    .bind(spec.overlap)
    .bind(spec.catch_up)
    .bind(origin)
    .bind(next_fire_at)
    .fetch_optional(conn)
    .await
}

/// Enables or disables a schedule, with its next tick.
pub async fn set_enabled(
    conn: &mut PgConnection,
    name: &str,
    enabled: bool,
    next_fire_at: Option<DateTime<Utc>>,
) -> Result<ScheduleRow, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "UPDATE schedules SET enabled = $2, next_fire_at = $3, updated_at = now() WHERE name = $1 RETURNING {COLUMNS}"
    )))
    .bind(name)
    .bind(enabled)
    .bind(next_fire_at)
    .fetch_one(conn)
    .await
}

/// Deletes a schedule (and its firing history; the runs stay). Returns whether it existed.
pub async fn delete(conn: &mut PgConnection, name: &str) -> Result<bool, sqlx::Error> {
    let done = sqlx::query("DELETE FROM schedules WHERE name = $1")
        .bind(name)
        .execute(conn)
        .await?;
    Ok(done.rows_affected() > 0)
}

/// Wakes every scheduler (after the transaction commits) to look at the schedules again.
pub async fn notify_changed(conn: &mut PgConnection, name: &str) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(CHANNEL)
        .bind(name)
        .execute(conn)
        .await?;
    Ok(())
}

/// Takes one enabled schedule whose next tick is due at `now`, locked for this transaction;
/// one another instance is handling is skipped, not waited for.
pub async fn claim_due(conn: &mut PgConnection, now: DateTime<Utc>) -> Result<Option<ScheduleRow>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM schedules
         WHERE enabled AND next_fire_at <= $1
         ORDER BY next_fire_at
         LIMIT 1
         FOR UPDATE SKIP LOCKED"
    )))
    .bind(now)
    .fetch_optional(conn)
    .await
}

/// The earliest next tick of any enabled schedule: when the scheduler must wake.
pub async fn next_due(pool: &PgPool) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    sqlx::query_scalar("SELECT min(next_fire_at) FROM schedules WHERE enabled")
        .fetch_one(pool)
        .await
}

/// Whether a run the schedule started is unfinished. Driven from the few unfinished runs, not
/// from the schedule's possibly long history.
pub async fn in_flight(conn: &mut PgConnection, name: &str) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (
             SELECT 1 FROM runs r
             WHERE run_status_is_unfinished(r.status)
               AND EXISTS (SELECT 1 FROM schedule_fires f WHERE f.run_id = r.id AND f.schedule = $1))",
    )
    .bind(name)
    .fetch_one(conn)
    .await
}

/// Records the run a tick (or a fire-now) started. Recording the same tick again (its run
/// was started before a crash) changes nothing; fire-nows never collide with ticks.
pub async fn record_fire(
    conn: &mut PgConnection,
    name: &str,
    tick: DateTime<Utc>,
    manual: bool,
    run_id: Uuid,
    fired_by: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO schedule_fires (schedule, tick, manual, run_id, fired_by) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT DO NOTHING",
    )
    .bind(name)
    .bind(tick)
    .bind(manual)
    .bind(run_id)
    .bind(fired_by)
    .execute(conn)
    .await?;
    Ok(())
}

/// Moves a handled schedule to its next tick, recording the last tick that started a run
/// (if any did) and why one could not (None clears it once a run starts).
pub async fn advance(
    conn: &mut PgConnection,
    name: &str,
    next_fire_at: Option<DateTime<Utc>>,
    last_fire: Option<(DateTime<Utc>, Uuid)>,
    last_error: Option<&str>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE schedules SET
             next_fire_at = $2,
             last_fire_at = coalesce($3, last_fire_at),
             last_run_id = CASE WHEN $3::timestamptz IS NULL THEN last_run_id ELSE $4 END,
             last_error = CASE WHEN $5::text IS NOT NULL THEN $5
                               WHEN $3::timestamptz IS NOT NULL THEN NULL
                               ELSE last_error END,
             updated_at = now()
         WHERE name = $1",
    )
    .bind(name)
    .bind(next_fire_at)
    .bind(last_fire.map(|(tick, _)| tick))
    .bind(last_fire.map(|(_, run)| run))
    .bind(last_error)
    .execute(conn)
    .await?;
    Ok(())
}

/// The latest runs a schedule started, newest first, with their status now.
pub async fn recent_fires<'e>(db: impl PgExecutor<'e>, name: &str, limit: i64) -> Result<Vec<FireRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT f.tick, f.manual, f.fired_by, f.fired_at, f.run_id, r.status, r.finished_at
         FROM schedule_fires f JOIN runs r ON r.id = f.run_id
         WHERE f.schedule = $1
         ORDER BY f.tick DESC, f.id DESC
         LIMIT $2",
    )
    .bind(name)
    .bind(limit)
    .fetch_all(db)
    .await
}

/// A run a schedule started, with the schedule's name: a row of [`recent_fires_of`].
#[derive(Debug, Clone, FromRow)]
pub struct NamedFireRow {
    /// The schedule.
    pub schedule: String,
    /// The run it started.
    #[sqlx(flatten)]
    pub fire: FireRow,
}

/// The latest runs of each of these schedules (at most `limit` each), with their status now,
/// grouped by schedule in the order of `names`, newest first within each. One statement
/// however many schedules are listed: per name, a scan of `schedule_fires_recent` that stops
/// after `limit` rows.
pub async fn recent_fires_of(pool: &PgPool, names: &[String], limit: i64) -> Result<Vec<NamedFireRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT n.name AS schedule, f.tick, f.manual, f.fired_by, f.fired_at, f.run_id, f.status, f.finished_at
         FROM unnest($1::text[]) WITH ORDINALITY AS n(name, position)
         CROSS JOIN LATERAL (
             SELECT f.id, f.tick, f.manual, f.fired_by, f.fired_at, f.run_id, r.status, r.finished_at
             FROM schedule_fires f JOIN runs r ON r.id = f.run_id
             WHERE f.schedule = n.name
             ORDER BY f.tick DESC, f.id DESC
             LIMIT $2
         ) f
         ORDER BY n.position, f.tick DESC, f.id DESC",
    )
    .bind(names)
    .bind(limit.max(0))
    .fetch_all(pool)
    .await
}
