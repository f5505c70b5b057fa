//! The read side behind operators' views (the dashboard's lists, status counts and charts):
//! queries that change nothing, kept off [`Engine`]'s API, which is for running workflows.
//! Their SQL is in `store`, with the rest of the engine's.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use super::status::RunStatus;
use super::store::{self, ActionRow, DurationBucket, FinishedMinute, InboxRow, RunFilter, StepBrief, WaitingRun};
use super::{Engine, EngineError};

/// Reads over the runs of one engine's database.
#[derive(Debug, Clone)]
pub struct RunReads {
    pool: PgPool,
}

impl RunReads {
    /// Reads over the runs `engine` keeps (on its API pool).
    pub fn of(engine: &Engine) -> Self {
        Self {
            pool: engine.pool().clone(),
        }
    }

    /// Runs matching the filter (its status part ignored) per status, each count stopping at
    /// `cap` so that counting stays cheap however many runs there are.
    pub async fn count_runs(&self, filter: &RunFilter, cap: i64) -> Result<Vec<(RunStatus, i64)>, EngineError> {
        Ok(store::count_by_status_capped(&self.pool, filter, cap).await?)
    }

    /// Unfinished runs per `(workflow, version)`.
    pub async fn unfinished_by_version(&self) -> Result<Vec<(String, i32, i64)>, EngineError> {
        Ok(store::unfinished_by_version(&self.pool).await?)
    }

    /// What was delivered to a run (signals, completions): the newest `limit`, newest first,
    /// and how many in all.
    pub async fn inbox(&self, run: Uuid, limit: i64) -> Result<(Vec<InboxRow>, i64), EngineError> {
        Ok(store::inbox_of(&self.pool, run, limit).await?)
    }

    /// The newest `limit` operator actions across runs and schedules, newest first.
    pub async fn recent_actions(&self, limit: i64) -> Result<Vec<ActionRow>, EngineError> {
        Ok(store::recent_actions(&self.pool, limit).await?)
    }

    /// Waiting runs, soonest deadline first (the overdue ones at the top), at most `limit`.
    pub async fn waiting_runs(&self, limit: i64) -> Result<Vec<WaitingRun>, EngineError> {
        Ok(store::waiting_runs(&self.pool, limit).await?)
    }

    /// How many runs wait, and how many of them are past their deadline at `now` (a worker
    /// should have ended those waits: many overdue ones mean no worker is claiming).
    pub async fn count_waiting(&self, now: DateTime<Utc>) -> Result<(i64, i64), EngineError> {
        Ok(store::count_waiting(&self.pool, now).await?)
    }

    /// The steps of several runs without their outputs (for lists showing progress).
    pub async fn step_briefs(&self, runs: &[Uuid]) -> Result<Vec<StepBrief>, EngineError> {
        Ok(store::step_briefs(&self.pool, runs).await?)
    }

    /// Runs finished per minute since `since`.
    pub async fn finished_per_minute(&self, since: DateTime<Utc>) -> Result<Vec<FinishedMinute>, EngineError> {
        Ok(store::finished_per_minute(&self.pool, since).await?)
    }

    /// p50/p99 run durations per bucket of `minutes` starting at each of `starts`, over at
    /// most `sample` runs per bucket; the summary over all of them first.
    pub async fn durations(
        &self,
        starts: &[DateTime<Utc>],
        minutes: i32,
        sample: i64,
    ) -> Result<Vec<DurationBucket>, EngineError> {
        Ok(store::durations(&self.pool, starts, minutes, sample).await?)
    }
}
