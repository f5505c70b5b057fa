//! The runs list (`/`): newest first, keyset pages, filters, search, counts per status and
//! the overview of the last hour.
//!
//! Counting: each status is counted up to [`COUNT_CAP`] runs (an index scan that stops
//! there; shown as "10,000+"), for the filter shown, and the counts of a filter are reused
//! for [`COUNT_CACHE`]. So a million runs cost at most seven capped scans every few seconds,
//! however many pages are open and however often live updates refresh them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use askama::Template;
use askama_web::WebTemplate;
use axum::extract::State;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::Dashboard;
use super::charts::{self, Overview};
use super::error::{PageError, encode_query_value};
use super::format;
use super::format::COUNT_CAP;
use super::session::Viewer;
use crate::engine::read::RunReads;
use crate::engine::{RunFilter, RunRow, StepBrief};
use crate::engine::{RunStatus, StepStatus};
use crate::http::error::ApiError;
use crate::http::extract::Params;
use crate::http::runs::{decode_cursor, encode_cursor, run_filter};

/// How long the counts of a filter are reused.
pub const COUNT_CACHE: Duration = Duration::from_secs(5);
/// Runs per page.
pub const PAGE_SIZE: i64 = 50;
/// The time ranges offered, by parameter value.
pub const RANGES: [(&str, &str, i64); 4] = [
    ("1h", "last hour", 60),
    ("24h", "last 24 hours", 24 * 60),
    ("7d", "last 7 days", 7 * 24 * 60),
    ("30d", "last 30 days", 30 * 24 * 60),
];

/// What the counts of a list depend on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CountKey {
    workflow: Option<String>,
    query: Option<String>,
    range: Option<String>,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
}

/// The runs list.
#[derive(Template, WebTemplate)]
#[template(path = "runs.html", config = "dashboard/askama.toml")]
pub struct RunsPage {
    /// The logged-in operator.
    pub operator: String,
    /// For the logout form.
    pub csrf: String,
    /// The rows.
    pub runs: Vec<RunLine>,
    /// Counts per status, as filter links.
    pub counts: Vec<CountLink>,
    /// The filter form's state.
    pub filter: FilterForm,
    /// The next page, if any.
    pub older: Option<String>,
    /// Back to the first page (shown on later pages).
    pub newest: Option<String>,
    /// Whether any filter is set.
    pub filtered: bool,
    /// The overview of the last hour.
    pub overview: Arc<Overview>,
    /// Runs waiting (for a signal, a completion or time), and how many are overdue.
    pub waiting: (i64, i64),
    /// The list's filter for a bulk action, its time range made absolute (so that the
    /// confirmation acts on the runs previewed, however long it takes to confirm).
    pub bulk_fields: Vec<(&'static str, String)>,
}

/// A row of the list.
#[derive(Debug, Clone)]
pub struct RunLine {
    /// Full id.
    pub id: String,
    /// First block of the id.
    pub short_id: String,
    /// The customer's email (the run's subject), or empty.
    pub subject: String,
    /// The workflow.
    pub workflow: String,
    /// Its status.
    pub status: &'static str,
    /// "3 of 5 steps"; for a run that ended without completing, "reached step 2 of 5".
    pub progress: String,
    /// The step it is at, or failed at.
    pub current: String,
    /// Retries ("none", "2 retries"), and compensation attempts if any.
    pub retries: String,
    /// Attempts in all, for the retries' tooltip.
    pub attempts: String,
    /// When it was accepted.
    pub started: String,
    /// For `<time datetime>`.
    pub started_iso: String,
    /// How long it took (or has been going).
    pub duration: String,
}

/// A status count that filters the list when clicked.
#[derive(Debug, Clone)]
pub struct CountLink {
    /// `all` or a status.
    pub status: &'static str,
    /// The count.
    pub count: String,
    /// The list filtered to it.
    pub href: String,
    /// Whether it is the status shown.
    pub active: bool,
}

/// The filter form's state.
#[derive(Debug, Clone, Default)]
pub struct FilterForm {
    /// The search text.
    pub q: String,
    /// Workflows to choose from, with whether each is selected.
    pub workflows: Vec<(String, bool)>,
    /// Statuses to choose from.
    pub statuses: Vec<(&'static str, bool)>,
    /// Ranges to choose from: value, label, selected.
    pub ranges: Vec<(&'static str, &'static str, bool)>,
}

/// The parameters of a list, kept in its links.
#[derive(Debug, Clone, Default)]
struct ListParams {
    workflow: Option<String>,
    status: Option<String>,
    q: Option<String>,
    range: Option<String>,
    from: Option<String>,
    to: Option<String>,
}

impl ListParams {
    fn href(&self, status: Option<&str>, cursor: Option<&str>) -> String {
        let pairs = [
            ("workflow", self.workflow.as_deref()),
            ("status", status),
            ("q", self.q.as_deref()),
            ("range", self.range.as_deref()),
            ("from", self.from.as_deref()),
            ("to", self.to.as_deref()),
            ("cursor", cursor),
        ];
        let query: Vec<String> = pairs
            .iter()
            .filter_map(|(k, v)| v.map(|v| format!("{k}={}", encode_query_value(v))))
            .collect();
        if query.is_empty() {
            "/".to_string()
        } else {
            format!("/?{}", query.join("&"))
        }
    }
}

/// Reads the time range parameter.
fn range_minutes(range: Option<&str>) -> Result<Option<i64>, ApiError> {
    match range {
        None => Ok(None),
        Some(value) => RANGES
            .iter()
            .find(|(v, _, _)| *v == value)
            .map(|(_, _, minutes)| Some(*minutes))
            .ok_or_else(|| ApiError::invalid("range", "must be one of 1h, 24h, 7d, 30d (or absent: all time)")),
    }
}

/// `GET /`: the runs list.
pub async fn page(
    viewer: Viewer,
    State(dashboard): State<Arc<Dashboard>>,
    params: Params,
) -> Result<RunsPage, PageError> {
    let mut filter = run_filter(&params)?;
    let kept = ListParams {
        workflow: filter.workflow.clone(),
        status: params.text("status", 200)?,
        q: filter.query.clone(),
        range: params.text("range", 10)?,
        from: params.text("from", 100)?,
        to: params.text("to", 100)?,
    };
    if let (Some(minutes), None) = (range_minutes(kept.range.as_deref())?, filter.created_from) {
        filter.created_from = Some(Utc::now() - chrono::Duration::minutes(minutes));
    }
    let cursor = params.text("cursor", 200)?.map(|c| decode_cursor(&c)).transpose()?;
    let engine = &dashboard.app.engine;

    let mut rows = engine.list_runs(&filter, cursor, PAGE_SIZE + 1).await?;
    let older = if rows.len() as i64 > PAGE_SIZE {
        rows.truncate(PAGE_SIZE as usize);
        rows.last()
            .map(|last| kept.href(kept.status.as_deref(), Some(&encode_cursor(last))))
    } else {
        None
    };
    let ids: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
    let mut steps: HashMap<Uuid, Vec<StepBrief>> = HashMap::new();
    for step in RunReads::of(engine).step_briefs(&ids).await? {
        steps.entry(step.run_id).or_default().push(step);
    }
    let now = Utc::now();
    let runs = rows
        .iter()
        .map(|run| line(run, steps.get(&run.id).map(Vec::as_slice).unwrap_or_default(), now))
        .collect();

    let counts = counts(&dashboard, &filter, &kept).await?;
    let overview = charts::load(&dashboard).await?;
    let waiting = RunReads::of(engine).count_waiting(engine.now()).await?;
    let mut workflows: Vec<String> = engine.workflows().iter().map(|w| w.name().to_string()).collect();
    workflows.dedup();
    let form = FilterForm {
        q: kept.q.clone().unwrap_or_default(),
        workflows: workflows
            .into_iter()
            .map(|w| {
                let selected = filter.workflow.as_deref() == Some(w.as_str());
                (w, selected)
            })
            .collect(),
        statuses: RunStatus::ALL
            .iter()
            .map(|s| (s.as_str(), filter.statuses.len() == 1 && filter.statuses[0] == *s))
            .collect(),
        ranges: RANGES
            .iter()
            .map(|(v, label, _)| (*v, *label, kept.range.as_deref() == Some(*v)))
            .collect(),
    };
    let count_links = count_links(&counts, &filter, &kept);
    let time = |t: Option<chrono::DateTime<Utc>>| t.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true));
    let bulk_fields = [
        ("workflow", filter.workflow.clone()),
        ("status", kept.status.clone()),
        ("q", filter.query.clone()),
        ("from", time(filter.created_from)),
        ("to", time(filter.created_to)),
    ]
    .into_iter()
    .filter_map(|(k, v)| Some((k, v?)))
    .collect();
    Ok(RunsPage {
        operator: viewer.session.operator,
        csrf: viewer.csrf,
        runs,
        counts: count_links,
        filter: form,
        newest: cursor.map(|_| kept.href(kept.status.as_deref(), None)),
        older,
        filtered: kept.workflow.is_some()
            || kept.status.is_some()
            || kept.q.is_some()
            || kept.range.is_some()
            || kept.from.is_some()
            || kept.to.is_some(),
        overview,
        waiting,
        bulk_fields,
    })
}

/// Counts per status for a filter (ignoring its status part), from the cache when fresh.
async fn counts(
    dashboard: &Dashboard,
    filter: &RunFilter,
    kept: &ListParams,
) -> Result<Vec<(RunStatus, i64)>, PageError> {
    let key = CountKey {
        workflow: filter.workflow.clone(),
        query: filter.query.clone(),
        range: kept.range.clone(),
        from: kept.from.as_ref().and(filter.created_from),
        to: filter.created_to,
    };
    if let Some(counts) = dashboard.counts.get(&key) {
        return Ok(counts);
    }
    let counts = RunReads::of(&dashboard.app.engine)
        .count_runs(filter, COUNT_CAP)
        .await?;
    dashboard.counts.put(key, counts.clone());
    Ok(counts)
}

fn count_links(counts: &[(RunStatus, i64)], filter: &RunFilter, kept: &ListParams) -> Vec<CountLink> {
    let total: i64 = counts.iter().map(|(_, n)| n).sum();
    let capped = counts.iter().any(|(_, n)| *n >= COUNT_CAP);
    let mut links = vec![CountLink {
        status: "all",
        count: format!("{}{}", format::count(total, None), if capped { "+" } else { "" }),
        href: kept.href(None, None),
        active: filter.statuses.is_empty(),
    }];
    links.extend(RunStatus::ALL.iter().map(|status| {
        let n = counts.iter().find(|(s, _)| s == status).map_or(0, |(_, n)| *n);
        CountLink {
            status: status.as_str(),
            count: format::count(n, Some(COUNT_CAP)),
            href: kept.href(Some(status.as_str()), None),
            active: filter.statuses.len() == 1 && filter.statuses[0] == *status,
        }
    }));
    links
}

/// A run as a row of the list.
pub fn line(run: &RunRow, steps: &[StepBrief], now: DateTime<Utc>) -> RunLine {
    let done = steps
        .iter()
        .filter(|s| {
            matches!(
                s.status,
                StepStatus::Succeeded
                    | StepStatus::Skipped
                    | StepStatus::Compensating
                    | StepStatus::Compensated
                    | StepStatus::CompensationFailed
            )
        })
        .count();
    let attempts: i64 = steps.iter().map(|s| i64::from(s.attempts)).sum();
    let started_steps = steps.iter().filter(|s| s.attempts > 0).count() as i64;
    let retries = attempts - started_steps;
    let undo: i64 = steps.iter().map(|s| i64::from(s.compensation_attempts)).sum();
    // Retries, not attempts: "5" beside a clean five-step run read as if it had retried.
    let mut retries_text = match retries {
        0 => "none".to_string(),
        1 => "1 retry".to_string(),
        n => format!("{n} retries"),
    };
    if undo > 0 {
        retries_text.push_str(&format!(
            ", {undo} undo {}",
            if undo == 1 { "attempt" } else { "attempts" }
        ));
    }
    let attempts_title = format!(
        "{attempts} {} of {} started {}",
        if attempts == 1 { "attempt" } else { "attempts" },
        started_steps,
        if started_steps == 1 { "step" } else { "steps" }
    );
    // A run that ended without completing says how far it got, not how many steps it kept:
    // "0 of 5 steps" for one that failed its first step read as if nothing had happened.
    let reached = steps.iter().filter(|s| s.attempts > 0).map(|s| s.idx + 1).max();
    let progress = match (run.status, reached) {
        (RunStatus::Compensated | RunStatus::Failed | RunStatus::Cancelled, Some(k)) => {
            format!("reached step {k} of {}", steps.len())
        }
        (RunStatus::Compensated | RunStatus::Failed | RunStatus::Cancelled, None) => "no step started".to_string(),
        _ => format!("{done} of {} steps", steps.len()),
    };
    let end = run.finished_at.unwrap_or(now);
    let mut duration = format::between(run.created_at, end);
    if run.finished_at.is_none() {
        duration.push_str(" so far");
    }
    RunLine {
        id: run.id.to_string(),
        short_id: format::short_id(run.id),
        subject: format::clip(run.subject.as_deref().unwrap_or_default(), 120),
        workflow: run.workflow.clone(),
        status: run.status.as_str(),
        progress,
        current: current_step(run, steps),
        retries: retries_text,
        attempts: attempts_title,
        started: format::time(run.created_at),
        started_iso: format::machine_time(run.created_at),
        duration,
    }
}

/// The step a run is at, or where it went wrong.
pub fn current_step(run: &RunRow, steps: &[StepBrief]) -> String {
    let find = |statuses: &[StepStatus]| steps.iter().rev().find(|s| statuses.contains(&s.status));
    let failed_step = || {
        run.error
            .as_ref()
            .and_then(|e| e.get("step"))
            .and_then(|s| s.as_str())
            .map(|s| format!("failed at {}", format::clip(s, 80)))
    };
    let text = match run.status {
        RunStatus::Pending if run.held => Some("waiting: its workflow is paused".to_string()),
        RunStatus::Pending => Some("waiting for a worker".to_string()),
        RunStatus::Running => find(&[StepStatus::Running])
            .map(|s| format!("{} (attempt {})", s.name, s.attempts))
            .or_else(|| find(&[StepStatus::Failed]).map(|s| format!("{} (retry {} due)", s.name, s.attempts + 1)))
            .or_else(|| {
                steps
                    .iter()
                    .find(|s| s.status == StepStatus::Pending)
                    .map(|s| s.name.clone())
            }),
        RunStatus::Compensating => {
            find(&[StepStatus::Compensating, StepStatus::CompensationFailed]).map(|s| format!("undoing {}", s.name))
        }
        RunStatus::Completed => None,
        RunStatus::Failed => find(&[StepStatus::CompensationFailed])
            .map(|s| format!("undo of {} gave up", s.name))
            .or_else(failed_step),
        RunStatus::Compensated => failed_step(),
        RunStatus::Cancelled => Some("cancelled by an operator".to_string()),
        RunStatus::Paused => Some(match run.paused_from {
            Some(RunStatus::Compensating) => "paused by an operator while undoing".to_string(),
            _ => "paused by an operator".to_string(),
        }),
    };
    text.map(|t| format::clip(&t, 120)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run(status: RunStatus, error: Option<serde_json::Value>) -> RunRow {
        let now = Utc::now();
        RunRow {
            id: Uuid::now_v7(),
            workflow: "w".into(),
            workflow_version: 1,
            status,
            input: json!({}),
            output: None,
            error,
            subject: Some("ada@example.com".into()),
            idempotency_key: None,
            trigger: crate::engine::Trigger::Api,
            retry_of: None,
            retried_by: None,
            cancel_requested: false,
            ready_at: None,
            lease_owner: None,
            lease_epoch: 1,
            lease_expires_at: None,
            created_at: now - chrono::Duration::milliseconds(1500),
            updated_at: now,
            finished_at: status.is_terminal().then_some(now),
            parked_reason: None,
            wait_kind: None,
            wait_name: None,
            wait_step: None,
            wait_attempt: None,
            wait_deadline: None,
            pause_requested: false,
            paused_from: None,
            held: false,
        }
    }

    fn step(run: &RunRow, idx: i16, name: &str, status: StepStatus, attempts: i32, undo: i32) -> StepBrief {
        StepBrief {
            run_id: run.id,
            idx,
            name: name.into(),
            status,
            attempts,
            compensation_attempts: undo,
        }
    }

    #[test]
    fn a_running_run_shows_where_it_is() {
        let r = run(RunStatus::Running, None);
        let steps = vec![
            step(&r, 0, "validate", StepStatus::Succeeded, 1, 0),
            step(&r, 1, "create", StepStatus::Failed, 2, 0),
            step(&r, 2, "emit", StepStatus::Pending, 0, 0),
        ];
        let l = line(&r, &steps, Utc::now());
        assert_eq!(l.progress, "1 of 3 steps");
        assert_eq!(l.current, "create (retry 3 due)");
        assert_eq!(l.retries, "1 retry");
        assert_eq!(l.attempts, "3 attempts of 2 started steps");
        assert!(l.duration.ends_with("so far"), "{}", l.duration);
    }

    #[test]
    fn a_compensated_run_shows_where_it_failed() {
        let r = run(
            RunStatus::Compensated,
            Some(json!({"step": "set-meta", "message": "boom", "retryable": true})),
        );
        let steps = vec![
            step(&r, 0, "create", StepStatus::Compensated, 1, 1),
            step(&r, 1, "set-meta", StepStatus::Failed, 3, 0),
        ];
        let l = line(&r, &steps, Utc::now());
        assert_eq!(l.progress, "reached step 2 of 2");
        assert_eq!(l.current, "failed at set-meta");
        assert_eq!(l.retries, "2 retries, 1 undo attempt");
        assert_eq!(l.attempts, "4 attempts of 2 started steps");
        assert_eq!(l.duration, "1.5 s");
    }

    #[test]
    fn a_clean_run_has_no_retries_and_one_that_failed_its_first_step_says_so() {
        let clean = run(RunStatus::Completed, None);
        let steps: Vec<StepBrief> = (0..5)
            .map(|i| step(&clean, i, "s", StepStatus::Succeeded, 1, 0))
            .collect();
        let l = line(&clean, &steps, Utc::now());
        assert_eq!((l.progress.as_str(), l.retries.as_str()), ("5 of 5 steps", "none"));
        assert_eq!(l.attempts, "5 attempts of 5 started steps");

        let first = run(
            RunStatus::Compensated,
            Some(json!({"step": "validate", "message": "no"})),
        );
        let mut steps = vec![step(&first, 0, "validate", StepStatus::Failed, 1, 0)];
        steps.extend((1..5).map(|i| step(&first, i, "s", StepStatus::Pending, 0, 0)));
        let l = line(&first, &steps, Utc::now());
        assert_eq!(
            (l.progress.as_str(), l.retries.as_str()),
            ("reached step 1 of 5", "none")
        );

        let cancelled = run(RunStatus::Cancelled, None);
        let steps = vec![step(&cancelled, 0, "validate", StepStatus::Pending, 0, 0)];
        assert_eq!(line(&cancelled, &steps, Utc::now()).progress, "no step started");
    }

    #[test]
    fn ranges_are_checked() {
        assert_eq!(range_minutes(Some("1h")).ok(), Some(Some(60)));
        assert_eq!(range_minutes(None).ok(), Some(None));
        assert!(matches!(range_minutes(Some("2h")), Err(ApiError::Invalid { field, .. }) if field == "range"));
    }

    #[test]
    fn links_keep_the_filter() {
        let kept = ListParams {
            q: Some("a+b@example.com".into()),
            range: Some("24h".into()),
            ..ListParams::default()
        };
        assert_eq!(
            kept.href(Some("failed"), None),
            "/?status=failed&q=a%2Bb%40example.com&range=24h"
        );
        assert_eq!(ListParams::default().href(None, None), "/");
    }
}
