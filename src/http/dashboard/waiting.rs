//! The waiting runs page (`/waiting`): every run whose step waits for a signal, a completion
//! or time, with what it waits for and its deadline, soonest first; waits past their
//! deadline are flagged overdue (a worker ends a wait at its deadline, so an overdue wait
//! means no worker is claiming runs).
//!
//! Cost: one index scan of the waiting runs (`runs_waiting`), at most [`LIMIT`] rows.

use std::sync::Arc;

use askama::Template;
use axum::extract::State;
use axum::response::Html;
use chrono::{DateTime, Utc};

use super::Dashboard;
use super::error::PageError;
use super::format;
use super::session::Viewer;
use crate::engine::WaitingRun;
use crate::engine::read::RunReads;
use crate::http::error::ApiError;

/// The most waiting runs the page lists.
pub const LIMIT: i64 = 200;

/// The waiting runs page.
#[derive(Template)]
#[template(path = "waiting.html", config = "dashboard/askama.toml")]
pub struct WaitingPage {
    /// The logged-in operator.
    pub operator: String,
    /// For the forms.
    pub csrf: String,
    /// All waiting runs, and how many are overdue.
    pub total: i64,
    /// See `total`.
    pub overdue: i64,
    /// The rows, soonest deadline first.
    pub runs: Vec<WaitingLine>,
}

/// A waiting run as the page shows it.
pub struct WaitingLine {
    /// Full id.
    pub id: String,
    /// First block of the id.
    pub short_id: String,
    /// The workflow.
    pub workflow: String,
    /// What operators search for.
    pub subject: String,
    /// The waiting step.
    pub step: String,
    /// `signal payment.succeeded`, `completion`, `sleep`.
    pub waits_for: String,
    /// The deadline, in UTC.
    pub deadline: String,
    /// For `<time datetime>`.
    pub deadline_machine: String,
    /// "in 59 min 58 s" or "overdue by 3 s".
    pub left: String,
    /// Past its deadline.
    pub overdue: bool,
}

/// The page.
pub async fn page(viewer: Viewer, State(dashboard): State<Arc<Dashboard>>) -> Result<Html<String>, PageError> {
    let engine = &dashboard.app.engine;
    let reads = RunReads::of(engine);
    let now = engine.now();
    let (total, overdue) = reads.count_waiting(now).await?;
    let runs = reads.waiting_runs(LIMIT).await?.iter().map(|r| line(r, now)).collect();
    let page = WaitingPage {
        operator: viewer.session.operator.clone(),
        csrf: viewer.csrf.clone(),
        total,
        overdue,
        runs,
    };
    let html = page
        .render()
        .map_err(|e| ApiError::Internal(format!("rendering the waiting page: {e}")))?;
    Ok(Html(html))
}

/// A waiting run as the page shows it at `now` (pure).
pub fn line(run: &WaitingRun, now: DateTime<Utc>) -> WaitingLine {
    let overdue = run.wait_deadline < now && !run.paused;
    WaitingLine {
        id: run.id.to_string(),
        short_id: format::short_id(run.id),
        workflow: run.workflow.clone(),
        subject: format::clip(run.subject.as_deref().unwrap_or_default(), 120),
        step: run.step.clone(),
        waits_for: match run.wait_kind {
            crate::engine::WaitKind::Signal => format!("signal {}", format::clip(&run.wait_name, 120)),
            kind => kind.as_str().to_string(),
        },
        deadline: format::time(run.wait_deadline),
        deadline_machine: format::machine_time(run.wait_deadline),
        left: if run.paused {
            "paused by an operator".to_string()
        } else if overdue {
            format!("overdue by {}", format::between(run.wait_deadline, now))
        } else {
            format!("in {}", format::between(now, run.wait_deadline))
        },
        overdue,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wait_past_its_deadline_is_flagged_overdue_unless_it_is_paused() {
        let now = Utc::now();
        let run = |deadline| WaitingRun {
            id: uuid::Uuid::now_v7(),
            workflow: "order".into(),
            subject: Some("a@example.com".into()),
            wait_kind: crate::engine::WaitKind::Signal,
            wait_name: "payment.succeeded".into(),
            step: "await-payment".into(),
            wait_deadline: deadline,
            paused: false,
        };
        let soon = line(&run(now + chrono::Duration::seconds(90)), now);
        assert!(!soon.overdue);
        assert_eq!(
            (soon.waits_for.as_str(), soon.left.as_str()),
            ("signal payment.succeeded", "in 1 min 30 s")
        );
        let late = line(&run(now - chrono::Duration::seconds(3)), now);
        assert!(late.overdue);
        assert_eq!(late.left, "overdue by 3 s");
        let paused = line(
            &WaitingRun {
                paused: true,
                ..run(now - chrono::Duration::seconds(3))
            },
            now,
        );
        assert!(!paused.overdue);
        assert_eq!(paused.left, "paused by an operator");
    }
}
