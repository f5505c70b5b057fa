//! Cron schedules: each tick of an enabled schedule starts one run of its workflow, exactly
//! once across all instances.
//!
//! - [`expr`]: cron expressions in a time zone, and the tick after or before an instant
//!   (crontab's five fields or the `cron` crate's six or seven; days clocks change).
//! - [`describe`]: an expression in words.
//! - [`plan`]: the pure decisions: which due ticks fire under the catch-up policy, where the
//!   next tick lies after a change, what the overlap policy allows.
//! - [`runner`]: the loop every instance may run: sleeps until the next tick (woken early by
//!   `NOTIFY` when schedules change), fires what is due.
//! - [`store`]: all SQL of schedules.
//!
//! Exactly once: a tick's run carries the idempotency key `schedule:<name>:<tick>` ([`tick_key`])
//! under the runs' unique `(workflow, idempotency_key)`, so however many instances handle the
//! same tick, and whatever crashes between starting the run and recording it, one run exists.
//! The schedule's row lock (`FOR UPDATE SKIP LOCKED`) only spares the others the work.

pub mod describe;
pub mod expr;
pub mod plan;
pub mod runner;
pub mod store;

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use uuid::Uuid;

use super::clock::Clock;
use super::definition::{InputError, parse_input};
use super::{Engine, EngineError, RESERVED_KEY_PREFIX, Trigger, TriggerOptions, Triggered};
pub use expr::{CronExpr, ExprError};
pub use plan::CatchUpRules;
pub use runner::{SchedulerConfig, SchedulerHandle};
pub use store::{FireRow, NamedFireRow, ScheduleRow};

/// Upcoming fire times shown per schedule.
pub const UPCOMING: usize = 5;
/// Recent runs shown per schedule.
pub const RECENT_RUNS: usize = 10;
/// The longest schedule name: the idempotency key `schedule:<name>:<tick>` must stay within
/// the runs' 255 characters.
pub const MAX_NAME_LEN: usize = 100;
/// The longest expression accepted.
pub const MAX_EXPRESSION_LEN: usize = 200;

/// What a tick does while an earlier run of the same schedule is unfinished.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, sqlx::Type, utoipa::ToSchema)]
#[sqlx(type_name = "schedule_overlap", rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum Overlap {
    /// Start another run anyway.
    Allow,
    /// Skip the tick (the default: most scheduled work must not run twice at once).
    #[default]
    Skip,
}

/// Which ticks missed while no instance was running fire once one is again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, sqlx::Type, utoipa::ToSchema)]
#[sqlx(type_name = "schedule_catch_up", rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum CatchUp {
    /// None: wait for the next tick.
    None,
    /// The most recent missed tick fires once (the default).
    #[default]
    Latest,
    /// Every missed tick fires, oldest first, up to a bound (the most recent ones).
    All,
}

/// Where a schedule was defined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, sqlx::Type, utoipa::ToSchema)]
#[sqlx(type_name = "schedule_origin", rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// Created through the API (or the library).
    Api,
    /// Declared in the schedules file: upserted at every start, so edits elsewhere last until
    /// the next start.
    File,
    /// Created by sagaflow itself when missing (the daily `retention-sweep`); yours to change.
    Builtin,
}

/// A schedule's definition: what the API takes and the schedules file holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSpec {
    /// 1 to 100 letters, digits, `.`, `-`, `_`, starting with a letter or digit. Required when
    /// creating; a replace (`PUT`) may leave it out, since the path names the schedule.
    #[serde(default)]
    pub name: String,
    /// Five crontab fields (`*/15 * * * *`), or six or seven with seconds first
    /// (`*/10 * * * * *`), or `@hourly`, `@daily`, `@weekly`, `@monthly`, `@yearly`.
    pub expression: String,
    /// The IANA time zone the expression's wall-clock times are in (default `UTC`).
    #[serde(default = "default_time_zone")]
    pub time_zone: String,
    /// The workflow each tick starts.
    pub workflow: String,
    /// The input of each run (default `{}`); checked against the workflow when saved.
    #[serde(default = "empty_object")]
    #[schema(value_type = Object)]
    pub input: Value,
    /// Whether ticks fire (default true).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// What a tick does while an earlier run of the schedule is unfinished (default `skip`).
    #[serde(default)]
    pub overlap: Overlap,
    /// Which missed ticks fire after a time with no instance running (default `latest`).
    #[serde(default)]
    pub catch_up: CatchUp,
}

fn default_time_zone() -> String {
    "UTC".into()
}

fn empty_object() -> Value {
    json!({})
}

fn yes() -> bool {
    true
}

/// The schedules file: `{"schedules": [ScheduleSpec, ...]}`, each with its name.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeclaredSchedules {
    /// The schedules, upserted at start-up.
    pub schedules: Vec<ScheduleSpec>,
}

impl DeclaredSchedules {
    /// Reads the file's JSON; an error names the offending field (`schedules[1].expression`).
    pub fn parse(text: &str) -> Result<Self, InputError> {
        let value: Value = serde_json::from_str(text).map_err(|e| InputError::new(".", e.to_string()))?;
        parse_input(&value)
    }
}

/// A schedule as operators see it: its row, the expression in words, what comes next and
/// what came last.
#[derive(Debug, Clone)]
pub struct ScheduleView {
    /// The stored schedule.
    pub schedule: ScheduleRow,
    /// The expression in words, with the time zone ("at 03:00 every day (UTC)").
    pub description: String,
    /// The next fire times (none while disabled).
    pub upcoming: Vec<DateTime<Utc>>,
    /// The latest runs it started, newest first, with their status.
    pub recent_runs: Vec<FireRow>,
}

/// Why a schedule operation was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    /// The name is empty, too long or has characters outside `A-Za-z0-9._-`.
    #[error(
        "invalid schedule name `{0}`: use 1 to 100 letters, digits, `.`, `-` or `_`, starting with a letter or digit"
    )]
    InvalidName(String),
    /// The expression or the time zone does not parse.
    #[error(transparent)]
    Expression(#[from] ExprError),
    /// The expression has no tick after now.
    #[error("the expression `{0}` never fires after now")]
    NeverFires(String),
    /// No workflow of that name is registered.
    #[error("unknown workflow `{0}`")]
    UnknownWorkflow(String),
    /// The input does not fit the workflow.
    #[error("input does not fit workflow `{workflow}`: {error}")]
    InvalidInput {
        /// The workflow.
        workflow: String,
        /// What is wrong, with the field's path inside the input.
        error: InputError,
    },
    /// A replace named a schedule other than the one in the path.
    #[error("the body names schedule `{body}` but the path names `{path}`")]
    NameMismatch {
        /// The name in the path.
        path: String,
        /// The name in the body.
        body: String,
    },
    /// A schedule of that name exists.
    #[error("a schedule named `{0}` already exists")]
    Duplicate(String),
    /// No schedule of that name.
    #[error("schedule `{0}` not found")]
    NotFound(String),
    /// Fire-now on a schedule whose overlap policy is `skip`, with a run in flight.
    #[error("a run of schedule `{0}` is still in flight and its overlap policy is `skip`")]
    InFlight(String),
    /// The engine refused to start the run.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The database failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

/// The idempotency key of a tick's run: `schedule:<name>:<tick in RFC 3339, UTC>`.
pub fn tick_key(name: &str, tick: DateTime<Utc>) -> String {
    format!(
        "{RESERVED_KEY_PREFIX}{name}:{}",
        tick.to_rfc3339_opts(SecondsFormat::Secs, true)
    )
}

/// The idempotency key of an operator's fire-now (not a tick: it never collides with one).
fn manual_key(name: &str, at: DateTime<Utc>) -> String {
    format!(
        "{RESERVED_KEY_PREFIX}{name}:manual:{}",
        at.to_rfc3339_opts(SecondsFormat::Micros, true)
    )
}

/// Whether `name` can name a schedule: 1 to 100 of `A-Za-z0-9._-`, starting with a letter
/// or digit.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && name.as_bytes()[0].is_ascii_alphanumeric()
}

fn check_name(name: &str) -> Result<(), ScheduleError> {
    if is_valid_name(name) {
        Ok(())
    } else {
        Err(ScheduleError::InvalidName(name.to_string()))
    }
}

impl ScheduleRow {
    /// The stored expression, parsed in its time zone.
    pub fn compile(&self) -> Result<CronExpr, ExprError> {
        CronExpr::parse(&self.expression, expr::parse_time_zone(&self.time_zone)?)
    }

    fn timing(&self) -> plan::Timing<'_> {
        plan::Timing {
            expression: &self.expression,
            time_zone: &self.time_zone,
            enabled: self.enabled,
        }
    }
}

impl ScheduleSpec {
    /// As it will be stored (trimmed), to compare with the stored timing.
    fn timing(&self) -> plan::Timing<'_> {
        plan::Timing {
            expression: self.expression.trim(),
            time_zone: self.time_zone.trim(),
            enabled: self.enabled,
        }
    }
}

/// How a definition is written.
#[derive(Debug, Clone, Copy)]
enum Write {
    /// A new schedule; an existing name is a conflict.
    Create,
    /// An existing schedule's new definition.
    Replace,
    /// Created or replaced (declared schedules).
    Upsert,
    /// Created only if missing (built-in defaults).
    CreateIfMissing,
}

impl Engine {
    /// The clock schedules run by.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.inner.clock
    }

    /// Starts this instance's scheduler (every instance may run one).
    pub async fn start_scheduler(&self, config: SchedulerConfig) -> Result<SchedulerHandle, EngineError> {
        runner::start(self.clone(), config).await
    }

    /// Checks a definition: name, time zone, expression (with a tick to come), workflow,
    /// and input against the workflow. Returns the parsed expression.
    pub fn check_schedule(&self, spec: &ScheduleSpec) -> Result<CronExpr, ScheduleError> {
        check_name(&spec.name)?;
        if spec.expression.chars().count() > MAX_EXPRESSION_LEN {
            return Err(ScheduleError::Expression(ExprError::Expression {
                expression: spec.expression.chars().take(20).chain("...".chars()).collect(),
                message: format!("longer than {MAX_EXPRESSION_LEN} characters"),
            }));
        }
        let tz = expr::parse_time_zone(&spec.time_zone)?;
        let cron = CronExpr::parse(&spec.expression, tz)?;
        let workflow = self
            .workflow(&spec.workflow)
            .ok_or_else(|| ScheduleError::UnknownWorkflow(spec.workflow.clone()))?;
        workflow
            .check_input(&spec.input)
            .map_err(|error| ScheduleError::InvalidInput {
                workflow: spec.workflow.clone(),
                error,
            })?;
        if cron.next_after(self.inner.clock.now()).is_none() {
            return Err(ScheduleError::NeverFires(spec.expression.clone()));
        }
        Ok(cron)
    }

    /// Creates a schedule (from the API). An existing name is refused.
    pub async fn create_schedule(&self, spec: ScheduleSpec, operator: &str) -> Result<ScheduleView, ScheduleError> {
        self.write_schedule(spec, Origin::Api, Write::Create, Some(operator))
            .await
    }

    /// Replaces the definition of schedule `name`. A change of expression, time zone or
    /// enabled state starts from the next tick after now; other changes keep the next tick.
    pub async fn replace_schedule(
        &self,
        name: &str,
        mut spec: ScheduleSpec,
        operator: &str,
    ) -> Result<ScheduleView, ScheduleError> {
        if spec.name.is_empty() {
            spec.name = name.to_string();
        } else if spec.name != name {
            return Err(ScheduleError::NameMismatch {
                path: name.to_string(),
                body: spec.name,
            });
        }
        self.write_schedule(spec, Origin::Api, Write::Replace, Some(operator))
            .await
    }

    /// Creates or replaces a schedule declared in the schedules file.
    pub async fn declare_schedule(&self, spec: ScheduleSpec) -> Result<ScheduleView, ScheduleError> {
        self.write_schedule(spec, Origin::File, Write::Upsert, None).await
    }

    /// Creates a built-in schedule unless one of that name exists (operators may have changed
    /// or disabled it: theirs stays). Returns whether it was created.
    pub async fn ensure_schedule(&self, spec: ScheduleSpec) -> Result<bool, ScheduleError> {
        let name = spec.name.clone();
        match self
            .write_schedule(spec, Origin::Builtin, Write::CreateIfMissing, None)
            .await
        {
            Ok(_) => Ok(true),
            Err(ScheduleError::Duplicate(existing)) if existing == name => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Writes a schedule; `operator`, when an operator asked (not the schedules file or a
    /// built-in), is recorded in the audit trail with the change.
    async fn write_schedule(
        &self,
        spec: ScheduleSpec,
        origin: Origin,
        how: Write,
        operator: Option<&str>,
    ) -> Result<ScheduleView, ScheduleError> {
        let cron = self.check_schedule(&spec)?;
        let now = self.inner.clock.now();
        let mut tx = self.inner.pool.begin().await?;
        let existing = store::get_for_update(&mut tx, &spec.name).await?;
        let row = match (how, existing) {
            (Write::Create | Write::CreateIfMissing, Some(_)) => return Err(ScheduleError::Duplicate(spec.name)),
            (Write::Replace, None) => return Err(ScheduleError::NotFound(spec.name)),
            (_, existing) => {
                let before = existing.as_ref().map(|row| (row.timing(), row.next_fire_at));
                let next = plan::next_fire_on_change(before, spec.timing(), &cron, now);
                let origin = match (&existing, origin) {
                    // A replace through the API does not make a declared schedule undeclared.
                    (Some(row), Origin::Api) => row.origin,
                    _ => origin,
                };
                let on_conflict = match how {
                    Write::Create | Write::CreateIfMissing => store::OnConflict::Keep,
                    Write::Replace | Write::Upsert => store::OnConflict::Replace,
                };
                // Two creates racing for a name that did not exist: the row lock above could
                // not serialize them, the primary key does.
                store::save(&mut tx, &spec, origin, next, on_conflict)
                    .await?
                    .ok_or_else(|| ScheduleError::Duplicate(spec.name.clone()))?
            }
        };
        if let Some(operator) = operator {
            let action = match how {
                Write::Replace => "schedule.replace",
                _ => "schedule.create",
            };
            let detail = serde_json::json!({"expression": row.expression, "time_zone": row.time_zone,
                                            "workflow": row.workflow, "enabled": row.enabled});
            record(&mut tx, operator, action, &row.name, detail).await?;
        }
        store::notify_changed(&mut tx, &row.name).await?;
        tx.commit().await?;
        Ok(self.view(row, Some(&cron)).await?)
    }

    /// Deletes a schedule. Runs it started stay.
    pub async fn delete_schedule(&self, name: &str, operator: &str) -> Result<(), ScheduleError> {
        let mut tx = self.inner.pool.begin().await?;
        if !store::delete(&mut tx, name).await? {
            return Err(ScheduleError::NotFound(name.to_string()));
        }
        record(&mut tx, operator, "schedule.delete", name, serde_json::json!({})).await?;
        store::notify_changed(&mut tx, name).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Enables or disables a schedule. Enabling starts from the next tick after now: ticks
    /// while it was disabled are not caught up.
    pub async fn set_schedule_enabled(
        &self,
        name: &str,
        enabled: bool,
        operator: &str,
    ) -> Result<ScheduleView, ScheduleError> {
        let mut tx = self.inner.pool.begin().await?;
        let row = store::get_for_update(&mut tx, name)
            .await?
            .ok_or_else(|| ScheduleError::NotFound(name.to_string()))?;
        // Disabling needs no expression: even one no longer understood can be switched off.
        let next = if enabled {
            let after = plan::Timing {
                enabled,
                ..row.timing()
            };
            let before = Some((row.timing(), row.next_fire_at));
            plan::next_fire_on_change(before, after, &row.compile()?, self.inner.clock.now())
        } else {
            None
        };
        let row = store::set_enabled(&mut tx, name, enabled, next).await?;
        let action = if enabled { "schedule.enable" } else { "schedule.disable" };
        record(
            &mut tx,
            operator,
            action,
            name,
            serde_json::json!({"next_fire_at": next}),
        )
        .await?;
        store::notify_changed(&mut tx, name).await?;
        tx.commit().await?;
        Ok(self.view(row, None).await?)
    }

    /// Starts a run of the schedule now, on an operator's request (whether or not it is
    /// enabled; refused while a run is in flight if its overlap policy is `skip`). The run's
    /// trigger is `schedule`.
    pub async fn fire_schedule(&self, name: &str, operator: &str) -> Result<Triggered, ScheduleError> {
        let mut tx = self.inner.pool.begin().await?;
        let row = store::get_for_update(&mut tx, name)
            .await?
            .ok_or_else(|| ScheduleError::NotFound(name.to_string()))?;
        let in_flight = row.overlap == Overlap::Skip && store::in_flight(&mut tx, name).await?;
        if !row.overlap.allows(in_flight) {
            return Err(ScheduleError::InFlight(name.to_string()));
        }
        let now = self.inner.clock.now();
        let triggered = self
            .trigger(
                &row.workflow,
                row.input.clone(),
                TriggerOptions {
                    idempotency_key: Some(manual_key(name, now)),
                    trigger: Some(Trigger::Schedule),
                },
            )
            .await?;
        store::record_fire(&mut tx, name, now, true, triggered.run_id, operator).await?;
        record(
            &mut tx,
            operator,
            "schedule.fire",
            name,
            serde_json::json!({"run": triggered.run_id}),
        )
        .await?;
        tx.commit().await?;
        Ok(triggered)
    }

    /// A schedule with its description, next fire times and latest runs.
    pub async fn schedule(&self, name: &str) -> Result<Option<ScheduleView>, ScheduleError> {
        match store::get(&self.inner.pool, name).await? {
            Some(row) => Ok(Some(self.view(row, None).await?)),
            None => Ok(None),
        }
    }

    /// Every schedule, by name, each with its description, next fire times and latest runs.
    /// Two statements however many schedules there are (see [`Engine::list_schedules`]).
    pub async fn schedules(&self) -> Result<Vec<ScheduleView>, ScheduleError> {
        let rows = store::list(&self.inner.pool).await?;
        Ok(self.views(rows, RECENT_RUNS).await?)
    }

    /// One page of schedules by name, each with its description, next fire times and up to
    /// `recent` latest runs: what an operator's list shows. Two statements however long the
    /// page (the schedules, then the latest runs of all of them together), so a list of
    /// hundreds of schedules costs no query per schedule.
    pub async fn list_schedules(&self, listing: &ScheduleListing) -> Result<Vec<ScheduleView>, ScheduleError> {
        let rows = store::list_page(
            &self.inner.pool,
            listing.contains.as_deref(),
            listing.after.as_deref(),
            listing.limit,
        )
        .await?;
        Ok(self.views(rows, listing.recent).await?)
    }

    /// The latest runs a schedule started, newest first (at most `limit`).
    pub async fn schedule_runs(&self, name: &str, limit: i64) -> Result<Vec<FireRow>, ScheduleError> {
        Ok(store::recent_fires(&self.inner.pool, name, limit).await?)
    }

    async fn view(&self, row: ScheduleRow, cron: Option<&CronExpr>) -> Result<ScheduleView, sqlx::Error> {
        let recent_runs = store::recent_fires(&self.inner.pool, &row.name, RECENT_RUNS as i64).await?;
        Ok(view_of(row, cron, recent_runs))
    }

    /// Views of many schedules, their latest runs read in one statement.
    async fn views(&self, rows: Vec<ScheduleRow>, recent: usize) -> Result<Vec<ScheduleView>, sqlx::Error> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let names: Vec<String> = rows.iter().map(|row| row.name.clone()).collect();
        let mut fires: HashMap<String, Vec<FireRow>> = HashMap::with_capacity(rows.len());
        for named in store::recent_fires_of(&self.inner.pool, &names, recent as i64).await? {
            fires.entry(named.schedule).or_default().push(named.fire);
        }
        Ok(rows
            .into_iter()
            .map(|row| {
                let recent_runs = fires.remove(&row.name).unwrap_or_default();
                view_of(row, None, recent_runs)
            })
            .collect())
    }
}

/// Which schedules [`Engine::list_schedules`] returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduleListing {
    /// Only schedules whose name or workflow contains this text (case-insensitive).
    pub contains: Option<String>,
    /// Only schedules named after this (the last name of the previous page).
    pub after: Option<String>,
    /// At most this many schedules.
    pub limit: i64,
    /// At most this many latest runs per schedule.
    pub recent: usize,
}

impl Default for ScheduleListing {
    fn default() -> Self {
        Self {
            contains: None,
            after: None,
            limit: 50,
            recent: RECENT_RUNS,
        }
    }
}

/// A schedule's view from its row and latest runs (pure: the expression is compiled here
/// unless the caller has it already).
fn view_of(row: ScheduleRow, cron: Option<&CronExpr>, recent_runs: Vec<FireRow>) -> ScheduleView {
    let compiled = match cron {
        Some(cron) => Ok(cron.clone()),
        None => row.compile(),
    };
    let (description, upcoming) = match &compiled {
        Ok(cron) => {
            let upcoming = match row.next_fire_at {
                // The stored next tick first: it may be due and not fired yet.
                Some(next) if row.enabled => {
                    let mut ticks = vec![next];
                    ticks.extend(cron.upcoming(next, UPCOMING - 1));
                    ticks
                }
                _ => Vec::new(),
            };
            (describe::describe(cron), upcoming)
        }
        Err(e) => (format!("{} (not understood: {e})", row.expression), Vec::new()),
    };
    ScheduleView {
        schedule: row,
        description,
        upcoming,
        recent_runs,
    }
}

/// What happened to one tick.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TickOutcome {
    /// A run was started for it.
    Started(Uuid),
    /// Its run existed already (another instance, or this one before a crash, started it).
    AlreadyStarted(Uuid),
    /// Skipped: a run of the schedule is in flight and its overlap policy is `skip`.
    SkippedOverlap,
    /// The engine refused the run (the workflow is gone, or no longer takes the input).
    Refused(String),
}

impl TickOutcome {
    /// The metric label.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Started(_) => "started",
            Self::AlreadyStarted(_) => "already_started",
            Self::SkippedOverlap => "skipped_overlap",
            Self::Refused(_) => "refused",
        }
    }
}

/// Records an operator's action on a schedule in the operators' audit trail.
async fn record(
    conn: &mut sqlx::PgConnection,
    operator: &str,
    action: &str,
    schedule: &str,
    detail: serde_json::Value,
) -> Result<(), sqlx::Error> {
    let audit = super::store::OperatorAction {
        schedule: Some(schedule),
        ..super::store::OperatorAction::by(operator.into(), action, detail)
    };
    super::store::record_action(conn, &audit).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_the_idempotency_key() {
        for good in ["nightly", "retention-sweep", "a.b_c-1", "9"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "-leading",
            "has space",
            "slash/name",
            "é",
            &"x".repeat(MAX_NAME_LEN + 1),
        ] {
            assert!(matches!(check_name(bad), Err(ScheduleError::InvalidName(_))), "{bad}");
        }
        let longest = tick_key(&"x".repeat(MAX_NAME_LEN), Utc::now());
        assert!(longest.len() <= 255);
        let manual = manual_key(&"x".repeat(MAX_NAME_LEN), Utc::now());
        assert!(manual.len() <= 255);
    }

    #[test]
    fn tick_keys_are_rfc3339_in_utc() {
        let tick = DateTime::parse_from_rfc3339("2026-03-08T03:30:00-04:00")
            .expect("time")
            .with_timezone(&Utc);
        assert_eq!(tick_key("nightly", tick), "schedule:nightly:2026-03-08T07:30:00Z");
    }

    #[test]
    fn specs_take_defaults_and_refuse_unknown_fields() {
        let spec: ScheduleSpec = serde_json::from_value(json!({
            "name": "n", "expression": "@daily", "workflow": "w"
        }))
        .expect("spec");
        assert_eq!(spec.time_zone, "UTC");
        assert_eq!(spec.input, json!({}));
        assert!(spec.enabled);
        assert_eq!((spec.overlap, spec.catch_up), (Overlap::Skip, CatchUp::Latest));
        let unknown = parse_input::<ScheduleSpec>(&json!({"expression": "@daily", "workflow": "w", "cron": 1}));
        assert!(unknown.is_err());
        let declared = DeclaredSchedules::parse(r#"{"schedules": [{"name": "a", "expression": 5, "workflow": "w"}]}"#);
        assert_eq!(
            declared.err().map(|e| e.field),
            Some("schedules[0].expression".to_string())
        );
        assert!(DeclaredSchedules::parse("not json").is_err());
    }
}
