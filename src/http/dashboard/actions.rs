//! The operator actions page (`/actions`): every operator action across runs and schedules,
//! newest first (who, what, on which run or schedule, when, and the note), from the audit
//! trail each action writes in its own transaction.
//!
//! Cost: one index scan of `operator_actions_recent`, at most [`LIMIT`] rows.

use std::sync::Arc;

use askama::Template;
use axum::extract::State;
use axum::response::Html;

use super::Dashboard;
use super::error::PageError;
use super::format;
use super::session::Viewer;
use crate::engine::ActionRow;
use crate::engine::read::RunReads;
use crate::http::error::ApiError;

/// The most actions the page lists.
pub const LIMIT: i64 = 200;

/// The operator actions page.
#[derive(Template)]
#[template(path = "actions.html", config = "dashboard/askama.toml")]
pub struct ActionsPage {
    /// The logged-in operator.
    pub operator: String,
    /// For the forms.
    pub csrf: String,
    /// Newest first.
    pub actions: Vec<ActionLine>,
}

/// One action as the page shows it.
pub struct ActionLine {
    /// When (UTC).
    pub at: String,
    /// Who.
    pub operator: String,
    /// What (`run.retry`, `schedule.disable`, ...).
    pub action: String,
    /// The run acted on: full and short id.
    pub run: Option<(String, String)>,
    /// The schedule acted on.
    pub schedule: Option<String>,
    /// The bulk action it was part of.
    pub bulk: String,
    /// The note.
    pub note: String,
    /// The rest, as compact JSON.
    pub detail: String,
}

/// The page.
pub async fn page(viewer: Viewer, State(dashboard): State<Arc<Dashboard>>) -> Result<Html<String>, PageError> {
    let rows = RunReads::of(&dashboard.app.engine).recent_actions(LIMIT).await?;
    let page = ActionsPage {
        operator: viewer.session.operator.clone(),
        csrf: viewer.csrf.clone(),
        actions: rows.iter().map(line).collect(),
    };
    let html = page
        .render()
        .map_err(|e| ApiError::Internal(format!("rendering the actions page: {e}")))?;
    Ok(Html(html))
}

/// An action as the page shows it (pure).
pub fn line(row: &ActionRow) -> ActionLine {
    ActionLine {
        at: format::time(row.at),
        operator: format::clip(&row.operator, 120),
        action: row.action.clone(),
        run: row.run_id.map(|id| (id.to_string(), format::short_id(id))),
        schedule: row.schedule.as_deref().map(|s| format::clip(s, 120)),
        bulk: row.bulk_id.map(format::short_id).unwrap_or_default(),
        note: format::clip(row.note.as_deref().unwrap_or_default(), 500),
        detail: format::clip(&row.detail.to_string(), 300),
    }
}
