//! `retention-sweep`: deletes runs that finished longer ago than the retention period, with
//! their steps and execution log (docs/contract.md §5). Input `{"older_than": "30d"}`, optional: the
//! configured period (default 30 days) when absent.
//!
//! Deleting history is maintenance, not a backend's business: the workflow is admin-only to
//! trigger ([`Access::Admin`]), and `older_than` is never below a configured floor (default one
//! day) nor above [`MAX_PERIOD`], so a typo cannot erase a month of audit trail and no input
//! can overflow the cutoff's arithmetic.
//!
//! One step, deleting in batches of [`BATCH`] runs, each batch its own short transaction that
//! skips locked runs: nothing holds locks for long, however large the backlog, and a retry
//! after a crash simply goes on (deleting is idempotent). A daily schedule runs it.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::engine::definition::parse_input;
use crate::engine::scheduler::{CatchUp, Overlap, ScheduleSpec};
use crate::engine::{Access, EngineError, InputError, RetryPolicy, Step, StepContext, StepDef, StepError, Workflow};

/// The workflow's name.
pub const NAME: &str = "retention-sweep";
/// Its one step.
pub const DELETE_EXPIRED_RUNS: &str = "delete-expired-runs";
/// Runs deleted per statement.
pub const BATCH: i64 = 500;
/// The retention period when none is configured.
pub const DEFAULT_PERIOD: Duration = Duration::from_secs(30 * 24 * 60 * 60);
/// The shortest period accepted unless configured otherwise: shorter is almost surely a
/// mistake, and would erase runs operators are still looking at.
pub const DEFAULT_FLOOR: Duration = Duration::from_secs(24 * 60 * 60);
/// The shortest floor that can be configured (tests and demos sweep minutes-old runs).
pub const MIN_FLOOR: Duration = Duration::from_secs(60);
/// The longest period accepted: a hundred years, far inside what a timestamp can subtract.
pub const MAX_PERIOD: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);
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

/// How long runs are kept, and the bounds every sweep's `older_than` must respect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// What a sweep whose input names no period keeps.
    pub default_period: Duration,
    /// The shortest `older_than` accepted, from an input or from the configuration.
    pub floor: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            default_period: DEFAULT_PERIOD,
            floor: DEFAULT_FLOOR,
        }
    }
}

impl Retention {
    /// Reads a retention period (`30d`) within `floor..=`[`MAX_PERIOD`], naming `field` when
    /// it is refused.
    pub fn parse_period(&self, field: &str, text: &str) -> Result<Duration, InputError> {
        let period = parse_duration(field, text)?;
        if period < self.floor {
            return Err(InputError::new(
                field,
                format!(
                    "must be at least {} (the configured floor, --retention-floor)",
                    humantime::format_duration(self.floor)
                ),
            ));
        }
        Ok(period)
    }

    /// Checks that the configured period respects the floor and the floor its own minimum.
    pub fn validate(&self) -> Result<(), InputError> {
        if self.floor < MIN_FLOOR || self.floor > MAX_PERIOD {
            return Err(InputError::new(
                "retention-floor",
                format!("must be from {} to 100 years", humantime::format_duration(MIN_FLOOR)),
            ));
        }
        if self.default_period < self.floor || self.default_period > MAX_PERIOD {
            return Err(InputError::new(
                "retention",
                format!(
                    "must be from the floor ({}) to 100 years",
                    humantime::format_duration(self.floor)
                ),
            ));
        }
        Ok(())
    }

    fn check_input(&self, input: &serde_json::Value) -> Result<(), InputError> {
        if !input.is_object() {
            return Err(InputError::new(
                ".",
                "expected a JSON object, e.g. {\"older_than\": \"30d\"}",
            ));
        }
        let input: RetentionInput = parse_input(input)?;
        if let Some(text) = input.older_than.as_deref() {
            self.parse_period("older_than", text)?;
        }
        Ok(())
    }
}

/// Reads a duration (`30d`, `12h`) of at most [`MAX_PERIOD`], naming `field` when refused.
pub fn parse_duration(field: &str, text: &str) -> Result<Duration, InputError> {
    let period = humantime::parse_duration(text.trim())
        .map_err(|e| InputError::new(field, format!("`{text}` is not a duration such as 30d or 12h: {e}")))?;
    if period > MAX_PERIOD {
        return Err(InputError::new(field, "must be at most 100 years"));
    }
    Ok(period)
}

/// The workflow: admin-only, keeping runs for the configured period unless the input says
/// otherwise, never less than the floor.
pub fn workflow(retention: Retention) -> Workflow {
    Workflow::builder(NAME, 1)
        .description("Delete runs that finished more than the retention period ago, with their steps and log")
        .access(Access::Admin)
        .input_check(move |input| retention.check_input(input))
        .step(
            StepDef::new(DELETE_EXPIRED_RUNS, DeleteExpiredRuns { retention })
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
    retention: Retention,
}

#[async_trait]
impl Step for DeleteExpiredRuns {
    type Output = SweepOutput;

    async fn invoke(&self, ctx: &mut StepContext<'_>) -> Result<SweepOutput, StepError> {
        let input: RetentionInput = ctx.input()?;
        let (period, said) = match input.older_than.as_deref() {
            Some(text) => (
                self.retention
                    .parse_period("older_than", text)
                    .map_err(|e| StepError::permanent(e.to_string()))?,
                // Echoed as given: `90d` read back as `2months 29days 2h 52m 48s` is no echo.
                text.trim().to_string(),
            ),
            None => (self.retention.default_period, in_words(self.retention.default_period)),
        };
        let engine = ctx.engine();
        // Checked although the period is bounded: a clock near the start of time must give a
        // permanent error, never a panic retried on every attempt.
        let cutoff = chrono::Duration::from_std(period)
            .ok()
            .and_then(|delta| engine.clock().now().checked_sub_signed(delta))
            .ok_or_else(|| StepError::permanent(format!("a cutoff {period:?} before now cannot be computed")))?;
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
            older_than: said,
            cutoff,
            deleted,
        })
    }
}

/// A period as people write it: whole days as `30d`, anything else in humantime's words.
fn in_words(period: Duration) -> String {
    const DAY: u64 = 24 * 3600;
    match period.as_secs() {
        secs if secs > 0 && secs % DAY == 0 && period.subsec_nanos() == 0 => format!("{}d", secs / DAY),
        _ => humantime::format_duration(period).to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_default_period_is_said_in_whole_days_when_it_is_whole_days() {
        assert_eq!(in_words(Duration::from_secs(90 * 24 * 3600)), "90d");
        assert_eq!(in_words(Duration::from_secs(36 * 3600)), "1day 12h");
    }

    #[test]
    fn inputs_name_what_is_wrong() {
        let rules = Retention::default();
        assert!(rules.check_input(&json!({})).is_ok());
        assert!(rules.check_input(&json!({"older_than": "30d"})).is_ok());
        assert!(rules.check_input(&json!({"older_than": "1d"})).is_ok());
        let refusal = |v| rules.check_input(&v).err().map(|e| (e.field, e.message));
        let field = |v| refusal(v).map(|(field, _)| field);
        assert_eq!(field(json!({"older_than": "soon"})), Some("older_than".into()));
        assert_eq!(field(json!({"older_than": 30})), Some("older_than".into()));
        assert_eq!(field(json!({"keep": "30d"})), Some("keep".into()));
        assert_eq!(field(json!([])), Some(".".into()));
        // Below the floor, and past what a cutoff can be computed for.
        let (field, message) = refusal(json!({"older_than": "23h"})).expect("refused");
        assert_eq!(field, "older_than");
        assert!(message.contains("at least 1day"), "{message}");
        let (_, message) = refusal(json!({"older_than": "99999999999d"})).expect("refused");
        assert!(message.contains("at most 100 years"), "{message}");
        assert_eq!(rules.parse_period("older_than", "30d").ok(), Some(DEFAULT_PERIOD));
        // A lower floor, configured.
        let lenient = Retention {
            floor: MIN_FLOOR,
            ..rules
        };
        assert!(lenient.check_input(&json!({"older_than": "5m"})).is_ok());
        assert!(lenient.check_input(&json!({"older_than": "10s"})).is_err());
    }

    #[test]
    fn configured_periods_respect_their_bounds() {
        assert!(Retention::default().validate().is_ok());
        let bad = [
            Retention {
                default_period: Duration::from_secs(3600),
                floor: DEFAULT_FLOOR,
            },
            Retention {
                default_period: DEFAULT_PERIOD,
                floor: Duration::from_secs(1),
            },
            Retention {
                default_period: MAX_PERIOD + Duration::from_secs(1),
                floor: DEFAULT_FLOOR,
            },
        ];
        for rules in bad {
            assert!(rules.validate().is_err(), "{rules:?}");
        }
    }
}
