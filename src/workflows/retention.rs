//! `retention-sweep`: deletes runs that finished longer ago than the retention period, with
//! their steps and execution log (DESIGN.md §5). Input `{"older_than": "30d"}`, optional: the
//! configured period (default 30 days) when absent.
//!
//! One step, deleting in batches of [`BATCH`] runs, each batch its own short statement that
//! skips locked runs: nothing holds locks for long, however large the backlog, and a retry
//! after a crash simply goes on (deleting is idempotent). A daily schedule runs it.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::engine::definition::parse_input;
use crate::engine::scheduler::{CatchUp, Overlap, ScheduleSpec};
use crate::engine::{EngineError, InputError, RetryPolicy, Step, StepContext, StepDef, StepError, Workflow};

/// The workflow's name.
pub const NAME: &str = "retention-sweep";
/// Its one step.
pub const DELETE_EXPIRED_RUNS: &str = "delete-expired-runs";
/// Runs deleted per statement.
pub const BATCH: i64 = 500;
/// The retention period when none is configured.
pub const DEFAULT_PERIOD: Duration = Duration::from_secs(30 * 24 * 60 * 60);
/// The shortest period accepted: anything shorter is almost surely a mistake.
pub const MIN_PERIOD: Duration = Duration::from_secs(60);
/// When the built-in schedule runs it: every day at 03:00 UTC.
pub const DEFAULT_EXPRESSION: &str = "0 3 * * *";

/// The workflow input.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionInput {
    /// How long finished runs are kept (`30d`, `12h`, `90m`); the configured period if absent.
    #[serde(default)]
    pub older_than: Option<String>,
}

/// What a sweep did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SweepOutput {
    /// The retention period applied.
    pub older_than: String,
    /// Runs that finished before this were deleted.
    pub cutoff: DateTime<Utc>,
    /// How many.
    pub deleted: u64,
}

/// Reads a retention period (`30d`), at least [`MIN_PERIOD`].
pub fn parse_period(text: &str) -> Result<Duration, InputError> {
    let period = humantime::parse_duration(text.trim()).map_err(|e| {
        InputError::new(
            "older_than",
            format!("`{text}` is not a duration such as 30d or 12h: {e}"),
        )
    })?;
    if period < MIN_PERIOD {
        return Err(InputError::new("older_than", "must be at least 1m"));
    }
    Ok(period)
}

fn check_input(input: &serde_json::Value) -> Result<(), InputError> {
    if !input.is_object() {
        return Err(InputError::new(
            ".",
            "expected a JSON object, e.g. {\"older_than\": \"30d\"}",
        ));
    }
    let input: RetentionInput = parse_input(input)?;
    input.older_than.as_deref().map(parse_period).transpose()?;
    Ok(())
}

/// The workflow, keeping runs for `default_period` unless the input says otherwise.
pub fn workflow(default_period: Duration) -> Workflow {
    Workflow::builder(NAME, 1)
        .description("Delete runs that finished more than the retention period ago, with their steps and log")
        .input_check(check_input)
        .step(
            StepDef::new(DELETE_EXPIRED_RUNS, DeleteExpiredRuns { default_period })
                .retry(RetryPolicy::attempts(5).initial_delay(Duration::from_secs(1))),
        )
        .build()
        .unwrap_or_else(|e| unreachable!("the built-in workflow is valid: {e}"))
}

/// The built-in daily schedule, created at start-up when no schedule of that name exists.
pub fn default_schedule() -> ScheduleSpec {
    ScheduleSpec {
        name: NAME.to_string(),
        expression: DEFAULT_EXPRESSION.to_string(),
        time_zone: "UTC".to_string(),
        workflow: NAME.to_string(),
        input: json!({}),
        enabled: true,
        overlap: Overlap::Skip,
        catch_up: CatchUp::Latest,
    }
}

struct DeleteExpiredRuns {
    default_period: Duration,
}

#[async_trait]
impl Step for DeleteExpiredRuns {
    type Output = SweepOutput;

    async fn invoke(&self, ctx: &mut StepContext<'_>) -> Result<SweepOutput, StepError> {
        let input: RetentionInput = ctx.input()?;
        let period = match input.older_than.as_deref() {
            Some(text) => parse_period(text).map_err(|e| StepError::permanent(e.to_string()))?,
            None => self.default_period,
        };
        let engine = ctx.engine();
        let cutoff = engine.clock().now()
            - chrono::Duration::from_std(period).map_err(|e| StepError::permanent(e.to_string()))?;
        let mut deleted = 0;
        loop {
            let batch = engine.delete_finished_runs(cutoff, BATCH).await.map_err(|e| match e {
                EngineError::Database(e) => StepError::from(e),
                other => StepError::permanent(other.to_string()),
            })?;
            deleted += batch;
            if batch < BATCH as u64 {
                break;
            }
            // Let the runs' own work through between batches.
            tokio::task::yield_now().await;
        }
        tracing::info!(deleted, %cutoff, "retention sweep done");
        Ok(SweepOutput {
            older_than: humantime::format_duration(period).to_string(),
            cutoff,
            deleted,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_name_what_is_wrong() {
        assert!(check_input(&json!({})).is_ok());
        assert!(check_input(&json!({"older_than": "30d"})).is_ok());
        let field = |v| check_input(&v).err().map(|e| e.field);
        assert_eq!(field(json!({"older_than": "soon"})), Some("older_than".into()));
        assert_eq!(field(json!({"older_than": "10s"})), Some("older_than".into()));
        assert_eq!(field(json!({"older_than": 30})), Some("older_than".into()));
        assert_eq!(field(json!({"keep": "30d"})), Some("keep".into()));
        assert_eq!(field(json!([])), Some(".".into()));
        assert_eq!(parse_period("30d").ok(), Some(DEFAULT_PERIOD));
    }
}
