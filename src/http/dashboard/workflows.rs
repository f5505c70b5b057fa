//! The workflows page (`/workflows`): every workflow this instance runs, built-in and
//! defined, each version with its count of unfinished runs, whether the workflow is paused
//! (with Pause and Resume), and each step with what it calls, its retry policies and its
//! timeout.
//!
//! Cost: the plans are in memory; the counts are one grouped statement over unfinished runs,
//! and the paused workflows one over their (few) rows.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use askama::Template;
use axum::Form;
use axum::extract::State;
use axum::extract::rejection::FormRejection;
use axum::response::{Html, Redirect};

use super::Dashboard;
use super::error::PageError;
use super::format;
use super::run::NoteForm;
use super::session::{Operator, Viewer};
use crate::engine::PausedWorkflow;
use crate::engine::machine::Actor;
use crate::engine::read::RunReads;
use crate::engine::{RetryPolicy, Source, Workflow};
use crate::http::error::ApiError;
use crate::http::extract::{Params, PathText};

/// The workflows page.
#[derive(Template)]
#[template(path = "workflows.html", config = "dashboard/askama.toml")]
pub struct WorkflowsPage {
    /// The logged-in operator.
    pub operator: String,
    /// For the forms.
    pub csrf: String,
    /// What an action just did.
    pub notice: Option<&'static str>,
    /// By name, newest version first within a name.
    pub workflows: Vec<WorkflowLine>,
}

/// One version of a workflow.
pub struct WorkflowLine {
    /// Its name.
    pub name: String,
    /// Its version.
    pub version: i32,
    /// `built-in` or `defined`.
    pub source: &'static str,
    /// What it is for.
    pub description: String,
    /// Its runs that are not finished.
    pub unfinished: i64,
    /// While the workflow is paused: by whom, since when, why, and how many runs it holds.
    pub paused: Option<String>,
    /// Its plan.
    pub steps: Vec<StepLine>,
}

/// One step of a plan.
pub struct StepLine {
    /// Position, from 1.
    pub number: usize,
    /// Its name.
    pub name: String,
    /// What it calls (an HTTP step's endpoint and path), or how it runs.
    pub calls: String,
    /// Its invoke's retry policy, in words.
    pub retry: String,
    /// Its compensation, in words.
    pub compensation: String,
    /// Its attempt timeout, in words.
    pub timeout: String,
}

/// The page.
pub async fn page(
    viewer: Viewer,
    State(dashboard): State<Arc<Dashboard>>,
    params: Params,
) -> Result<Html<String>, PageError> {
    let engine = &dashboard.app.engine;
    let notice = match params.text("done", 20)?.as_deref() {
        Some("paused") => Some("Workflow paused: its new runs are accepted and held until you resume it."),
        Some("resumed") => Some("Workflow resumed: the runs it held are starting."),
        _ => None,
    };
    let paused = engine.paused_workflows().await?;
    let counts: HashMap<(String, i32), i64> = RunReads::of(engine)
        .unfinished_by_version()
        .await?
        .into_iter()
        .map(|(name, version, n)| ((name, version), n))
        .collect();
    let mut workflows = engine.workflows();
    workflows.sort_by(|a, b| a.name().cmp(b.name()).then(b.version().cmp(&a.version())));
    let page = WorkflowsPage {
        operator: viewer.session.operator.clone(),
        csrf: viewer.csrf.clone(),
        notice,
        workflows: workflows
            .iter()
            .map(|w| {
                line(
                    w,
                    counts.get(&(w.name().to_string(), w.version())).copied().unwrap_or(0),
                    paused.iter().find(|p| p.workflow == w.name()),
                )
            })
            .collect(),
    };
    let html = page
        .render()
        .map_err(|e| ApiError::Internal(format!("rendering the workflows page: {e}")))?;
    Ok(Html(html))
}

/// A version as the page shows it (pure).
pub fn line(workflow: &Workflow, unfinished: i64, paused: Option<&PausedWorkflow>) -> WorkflowLine {
    WorkflowLine {
        paused: paused.map(|p| {
            let mut text = format!(
                "Paused by {} since {}; {} run{} held",
                format::clip(&p.paused_by, 120),
                format::time(p.paused_at),
                p.held_runs,
                if p.held_runs == 1 { "" } else { "s" }
            );
            if let Some(note) = &p.note {
                text.push_str(&format!(" ({})", format::clip(note, 300)));
            }
            text
        }),
        name: workflow.name().to_string(),
        version: workflow.version(),
        source: match workflow.source() {
            Source::Builtin => "built-in",
            Source::Defined => "defined",
        },
        description: workflow.description().to_string(),
        unfinished,
        steps: workflow
            .steps()
            .iter()
            .enumerate()
            .map(|(i, s)| StepLine {
                number: i + 1,
                name: s.name().to_string(),
                calls: match s.calls() {
                    Some(calls) => calls.to_string(),
                    None if s.is_hook() => "hook point (the embedding application's handler)".into(),
                    None => "Rust code in the server".into(),
                },
                retry: policy(s.retry_policy()),
                compensation: if s.has_compensation() {
                    policy(s.compensation_retry_policy())
                } else {
                    "none".into()
                },
                timeout: s.attempt_timeout().map(duration).unwrap_or_else(|| "none".into()),
            })
            .collect(),
    }
}

fn policy(p: &RetryPolicy) -> String {
    if p.max_attempts <= 1 {
        return "1 attempt".into();
    }
    format!(
        "{} attempts, {} then ×{}, at most {}",
        p.max_attempts,
        duration(p.initial_delay),
        p.backoff_factor,
        duration(p.max_delay)
    )
}

fn duration(d: Duration) -> String {
    format::duration_ms(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// `POST /workflows/{name}/pause`: new runs of the workflow are accepted and held.
pub async fn pause(
    operator: Operator,
    State(dashboard): State<Arc<Dashboard>>,
    path: Result<PathText, ApiError>,
    form: Result<Form<NoteForm>, FormRejection>,
) -> Result<Redirect, PageError> {
    pause_or_resume(operator, dashboard, path, form, true).await
}

/// `POST /workflows/{name}/resume`: the runs the workflow held start.
pub async fn resume(
    operator: Operator,
    State(dashboard): State<Arc<Dashboard>>,
    path: Result<PathText, ApiError>,
    form: Result<Form<NoteForm>, FormRejection>,
) -> Result<Redirect, PageError> {
    pause_or_resume(operator, dashboard, path, form, false).await
}

async fn pause_or_resume(
    operator: Operator,
    dashboard: Arc<Dashboard>,
    path: Result<PathText, ApiError>,
    form: Result<Form<NoteForm>, FormRejection>,
    pause: bool,
) -> Result<Redirect, PageError> {
    let note = super::run::checked_note(&operator, form)?;
    let PathText(name) = path?;
    let actor = Actor {
        note: note.as_deref(),
        ..Actor::from(operator.session.operator.as_str())
    };
    let engine = &dashboard.app.engine;
    if pause {
        engine.pause_workflow(&name, actor).await?;
    } else {
        engine.resume_workflow(&name, actor).await?;
    }
    tracing::info!(workflow = %name, pause, operator = %operator.session.operator, "dashboard: workflow pause or resume");
    let done = if pause { "paused" } else { "resumed" };
    Ok(Redirect::to(&format!("/workflows?done={done}")))
}
