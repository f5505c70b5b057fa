//! Bulk actions from the runs list (`POST /bulk`, then `POST /bulk/confirm`): the list's
//! filter, frozen into absolute times, is previewed as a dry run (how many runs, a sample),
//! and acted on only once the operator confirms with that count in front of them.

use std::sync::Arc;

use askama::Template;
use axum::Form;
use axum::extract::State;
use axum::extract::rejection::FormRejection;
use axum::response::Html;
use serde::Deserialize;

use super::Dashboard;
use super::error::PageError;
use super::format;
use super::session::Operator;
use crate::engine::{BulkAction, BulkOutcome, MAX_BULK_RUNS};
use crate::http::error::ApiError;
use crate::http::runs::{BulkFilter, bulk_filter};

/// The bulk form: the action and the list's filter.
#[derive(Debug, Deserialize)]
pub struct BulkForm {
    /// The session's CSRF token.
    pub csrf: Option<String>,
    /// `retry`, `cancel`, `pause` or `resume`.
    #[serde(default)]
    pub action: String,
    /// The list's filter.
    #[serde(default)]
    pub workflow: String,
    /// See `workflow`.
    #[serde(default)]
    pub status: String,
    /// See `workflow`.
    #[serde(default)]
    pub q: String,
    /// See `workflow` (RFC 3339).
    #[serde(default)]
    pub from: String,
    /// See `workflow` (RFC 3339).
    #[serde(default)]
    pub to: String,
}

/// The preview (and, once confirmed, the result) of a bulk action.
#[derive(Template)]
#[template(path = "bulk.html", config = "dashboard/askama.toml")]
pub struct BulkPage {
    /// The logged-in operator.
    pub operator: String,
    /// For the forms.
    pub csrf: String,
    /// `retry`, `cancel`, `pause` or `resume`.
    pub action: &'static str,
    /// Which runs the action applies to, in words.
    pub applies_to: &'static str,
    /// What was done to each, in words.
    pub did: &'static str,
    /// The filter, in words.
    pub filter_text: String,
    /// The filter's fields, carried to the confirmation.
    pub fields: Vec<(&'static str, String)>,
    /// Runs the action applies to.
    pub matched: String,
    /// How many one confirmation acts on.
    pub will_act: i64,
    /// Done: how many were acted on, and the bulk id.
    pub done: Option<(usize, String)>,
    /// Runs skipped (they changed meanwhile), with why.
    pub skipped: Vec<(String, String)>,
    /// Some of the runs: full id and short id.
    pub sample: Vec<(String, String)>,
}

fn parsed(form: &BulkForm) -> Result<(BulkAction, crate::engine::RunFilter), ApiError> {
    let action = match form.action.as_str() {
        "retry" => BulkAction::Retry,
        "cancel" => BulkAction::Cancel,
        "pause" => BulkAction::Pause,
        "resume" => BulkAction::Resume,
        _ => return Err(ApiError::invalid("action", "choose retry, cancel, pause or resume")),
    };
    let time = |field: &str, text: &str| -> Result<Option<chrono::DateTime<chrono::Utc>>, ApiError> {
        if text.trim().is_empty() {
            return Ok(None);
        }
        chrono::DateTime::parse_from_rfc3339(text.trim())
            .map(|t| Some(t.with_timezone(&chrono::Utc)))
            .map_err(|e| ApiError::invalid(field, format!("not an RFC 3339 time: {e}")))
    };
    let some = |text: &str| (!text.trim().is_empty()).then(|| text.trim().to_string());
    let filter = bulk_filter(BulkFilter {
        workflow: some(&form.workflow),
        status: some(&form.status),
        q: some(&form.q),
        from: time("from", &form.from)?,
        to: time("to", &form.to)?,
    })?;
    Ok((action, filter))
}

fn page(operator: &Operator, form: &BulkForm, action: BulkAction, outcome: &BulkOutcome, done: bool) -> BulkPage {
    let fields: Vec<(&'static str, String)> = [
        ("workflow", &form.workflow),
        ("status", &form.status),
        ("q", &form.q),
        ("from", &form.from),
        ("to", &form.to),
    ]
    .into_iter()
    .filter(|(_, v)| !v.trim().is_empty())
    .map(|(k, v)| (k, v.trim().to_string()))
    .collect();
    let filter_text = if fields.is_empty() {
        "every run".to_string()
    } else {
        fields
            .iter()
            .map(|(k, v)| format!("{k} = {}", format::clip(v, 120)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    BulkPage {
        operator: operator.session.operator.clone(),
        csrf: operator.csrf(),
        action: match action {
            BulkAction::Retry => "retry",
            BulkAction::Cancel => "cancel",
            BulkAction::Pause => "pause",
            BulkAction::Resume => "resume",
        },
        applies_to: match action {
            BulkAction::Retry => {
                "retried (failed runs resume; compensated and cancelled ones not retried yet start again)"
            }
            BulkAction::Cancel => "cancelled (pending or running, not already cancelled)",
            BulkAction::Pause => {
                "paused (pending, running or compensating, not already asked to pause): each after its attempt in flight"
            }
            BulkAction::Resume => "resumed (paused, or asked to pause)",
        },
        did: match action {
            BulkAction::Retry => "retried",
            BulkAction::Cancel => "asked to cancel",
            BulkAction::Pause => "paused or asked to pause",
            BulkAction::Resume => "resumed",
        },
        filter_text,
        fields,
        matched: format::count(outcome.matched, Some(crate::engine::BULK_COUNT_CAP)),
        will_act: outcome.matched.min(MAX_BULK_RUNS),
        done: done.then(|| (outcome.acted, outcome.bulk_id.to_string())),
        skipped: outcome
            .skipped
            .iter()
            .map(|s| (s.id.to_string(), format::clip(&s.reason, 300)))
            .collect(),
        sample: outcome
            .sample
            .iter()
            .map(|id| (id.to_string(), format::short_id(*id)))
            .collect(),
    }
}

fn render(page: BulkPage) -> Result<Html<String>, PageError> {
    Ok(Html(page.render().map_err(|e| {
        ApiError::Internal(format!("rendering the bulk page: {e}"))
    })?))
}

/// `POST /bulk`: the dry run of the action on the list's filter, with a confirmation.
pub async fn preview(
    operator: Operator,
    State(dashboard): State<Arc<Dashboard>>,
    form: Result<Form<BulkForm>, FormRejection>,
) -> Result<Html<String>, PageError> {
    run(&operator, &dashboard, form, true).await
}

/// `POST /bulk/confirm`: acts on at most [`MAX_BULK_RUNS`] runs of the filter, and says
/// what it did.
pub async fn confirm(
    operator: Operator,
    State(dashboard): State<Arc<Dashboard>>,
    form: Result<Form<BulkForm>, FormRejection>,
) -> Result<Html<String>, PageError> {
    run(&operator, &dashboard, form, false).await
}

/// Checks the form (its CSRF token first), then runs the bulk action, as a dry run or not.
async fn run(
    operator: &Operator,
    dashboard: &Dashboard,
    form: Result<Form<BulkForm>, FormRejection>,
    dry_run: bool,
) -> Result<Html<String>, PageError> {
    let form = form.ok().map(|Form(f)| f);
    operator.check_csrf(form.as_ref().and_then(|f| f.csrf.as_deref()))?;
    let form = form.ok_or_else(|| ApiError::invalid("action", "choose retry, cancel, pause or resume"))?;
    let (action, filter) = parsed(&form)?;
    let by = &operator.session.operator;
    let outcome = dashboard
        .app
        .engine
        .bulk(action, &filter, dry_run, MAX_BULK_RUNS, by)
        .await?;
    if !dry_run {
        tracing::info!(bulk_id = %outcome.bulk_id, acted = outcome.acted, operator = %by, "dashboard: bulk action");
    }
    render(page(operator, &form, action, &outcome, !dry_run))
}
