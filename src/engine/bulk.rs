//! Bulk operator actions (DESIGN.md §11): retry, cancel, pause or resume every run a filter matches (the
//! filter of `GET /v1/runs`), at most [`MAX_BULK_RUNS`] per call, each run acted on by the
//! same path as a single action, in its own transaction, with one log entry naming the
//! operator and the bulk action's id. A dry run counts and samples and writes nothing.

use serde::Serialize;
use uuid::Uuid;

use super::machine::Actor;
use super::store::{self, Eligible, RunFilter};
use super::{Engine, EngineError};

/// The most runs one bulk call acts on.
pub const MAX_BULK_RUNS: i64 = 1000;
/// How many ids a bulk answer lists as its sample.
pub const BULK_SAMPLE: usize = 20;
/// Matching runs are counted up to this many (more: "at least this many").
pub const BULK_COUNT_CAP: i64 = 100_000;

/// What a bulk call does to each run it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BulkAction {
    /// Retry (a failed run resumes; a compensated or cancelled one starts again).
    Retry,
    /// Cancel (stop after the attempt in flight and compensate).
    Cancel,
    /// Pause (after the attempt in flight; no lease held while paused).
    Pause,
    /// Resume a paused run (or withdraw a pause not yet taken).
    Resume,
}

/// What a bulk call did.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct BulkOutcome {
    /// Names this call in every log entry it wrote.
    pub bulk_id: Uuid,
    /// Runs the filter matches that the action applies to (at most [`BULK_COUNT_CAP`]).
    pub matched: i64,
    /// Runs acted on (0 for a dry run).
    pub acted: usize,
    /// Some of the runs it would act on (dry run) or acted on.
    pub sample: Vec<Uuid>,
    /// Runs the action could not be applied to after all (they changed meanwhile), and why.
    pub skipped: Vec<BulkSkip>,
}

/// A run a bulk action left alone.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct BulkSkip {
    /// The run.
    pub id: Uuid,
    /// Why.
    pub reason: String,
}

impl Engine {
    /// Applies `action` to the runs `filter` matches that it applies to, oldest first, at
    /// most `limit` (1 to [`MAX_BULK_RUNS`]). With `dry_run`, only counts and samples.
    pub async fn bulk(
        &self,
        action: BulkAction,
        filter: &RunFilter,
        dry_run: bool,
        limit: i64,
        operator: &str,
    ) -> Result<BulkOutcome, EngineError> {
        if !(1..=MAX_BULK_RUNS).contains(&limit) {
            return Err(EngineError::BulkLimit {
                limit,
                max: MAX_BULK_RUNS,
            });
        }
        let eligible = match action {
            BulkAction::Retry => Eligible::Retry,
            BulkAction::Cancel => Eligible::Cancel,
            BulkAction::Pause => Eligible::Pause,
            BulkAction::Resume => Eligible::Resume,
        };
        let bulk_id = Uuid::now_v7();
        let matched = store::count_eligible(&self.inner.pool, filter, eligible, BULK_COUNT_CAP).await?;
        let runs = store::eligible_runs(&self.inner.pool, filter, eligible, limit).await?;
        if dry_run {
            return Ok(BulkOutcome {
                bulk_id,
                matched,
                acted: 0,
                sample: runs.into_iter().take(BULK_SAMPLE).collect(),
                skipped: Vec::new(),
            });
        }
        let actor = Actor {
            by: operator,
            bulk: Some(bulk_id),
            note: None,
        };
        let mut acted = Vec::new();
        let mut skipped = Vec::new();
        for run in runs {
            let done = match action {
                BulkAction::Retry => self.retry_as(run, actor).await.map(|_| ()),
                BulkAction::Cancel => self.cancel_as(run, actor).await,
                BulkAction::Pause => self.pause_as(run, actor).await,
                BulkAction::Resume => self.resume_as(run, actor).await,
            };
            match done {
                Ok(()) => acted.push(run),
                // Moved on since it was listed (finished, retried, cancelled by someone else).
                Err(e @ (EngineError::NotAllowed { .. } | EngineError::AlreadyRetried { .. })) => {
                    skipped.push(BulkSkip {
                        id: run,
                        reason: e.to_string(),
                    })
                }
                Err(e) => return Err(e),
            }
        }
        tracing::info!(%bulk_id, ?action, acted = acted.len(), skipped = skipped.len(), operator, "bulk action");
        let summary = store::OperatorAction::by(
            actor,
            "runs.bulk",
            serde_json::json!({
                "action": action, "matched": matched, "acted": acted.len(), "skipped": skipped.len(),
                "filter": {"workflow": filter.workflow, "statuses": filter.statuses, "q": filter.query,
                           "from": filter.created_from, "to": filter.created_to},
            }),
        );
        let mut conn = self.inner.pool.acquire().await?;
        store::record_action(&mut conn, &summary).await?;
        Ok(BulkOutcome {
            bulk_id,
            matched,
            acted: acted.len(),
            sample: acted.into_iter().take(BULK_SAMPLE).collect(),
            skipped,
        })
    }
}
