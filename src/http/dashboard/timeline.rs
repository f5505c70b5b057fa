//! A run's timeline: one bar per step attempt and per compensation attempt, to scale,
//! derived from the execution log alone (pure, so it is tested without a database).
//!
//! An attempt starts at its `step_started` (or `step_compensation_started`) entry and ends at
//! the matching `*_succeeded` or `*_failed` entry. An attempt that never got an outcome was
//! interrupted (its worker died or shut down: the log then shows a lease taken over or
//! released, or the attempt started again); one still open on a run in flight is running.

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::format;
use crate::engine::EventKind;
use crate::engine::EventRow;

/// Invoke or compensation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The step itself.
    Invoke,
    /// Its compensation.
    Compensate,
}

/// How an attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It succeeded.
    Succeeded,
    /// It failed (the error is on the attempt).
    Failed,
    /// It is still running.
    Running,
    /// It never reported an outcome: its worker went away.
    Interrupted,
}

/// One attempt of a step or of its compensation.
#[derive(Debug, Clone, PartialEq)]
pub struct Attempt {
    /// The step.
    pub step: String,
    /// Invoke or compensation.
    pub phase: Phase,
    /// Its number (from 1, per phase).
    pub number: i32,
    /// When it started.
    pub start: DateTime<Utc>,
    /// When it ended (or now, while running).
    pub end: DateTime<Utc>,
    /// How it ended.
    pub outcome: Outcome,
    /// Its error, when it failed.
    pub error: Option<String>,
}

/// The attempts recorded in a run's log, in start order. `end_of_run` closes what is still
/// open: the run's end when it is over (interrupted), or now (running).
pub fn attempts(events: &[EventRow], end_of_run: DateTime<Utc>, run_over: bool) -> Vec<Attempt> {
    let mut done: Vec<Attempt> = Vec::new();
    let mut open: Vec<Attempt> = Vec::new();
    let close = |open: &mut Vec<Attempt>, done: &mut Vec<Attempt>, step: &str, phase: Phase, at, outcome, error| {
        if let Some(i) = open.iter().position(|a| a.step == step && a.phase == phase) {
            let mut attempt = open.remove(i);
            attempt.end = at;
            attempt.outcome = outcome;
            attempt.error = error;
            done.push(attempt);
        }
    };
    for event in events {
        let step = event.step.as_deref().unwrap_or_default();
        let error = || event.detail.get("error").and_then(Value::as_str).map(str::to_string);
        match event.kind {
            EventKind::StepStarted | EventKind::StepCompensationStarted => {
                let phase = if event.kind == EventKind::StepStarted {
                    Phase::Invoke
                } else {
                    Phase::Compensate
                };
                // A new attempt while one is open: the open one never reported back.
                close(&mut open, &mut done, step, phase, event.at, Outcome::Interrupted, None);
                open.push(Attempt {
                    step: step.to_string(),
                    phase,
                    number: event.attempt.unwrap_or(0),
                    start: event.at,
                    end: event.at,
                    outcome: Outcome::Running,
                    error: None,
                });
            }
            EventKind::StepSucceeded => close(
                &mut open,
                &mut done,
                step,
                Phase::Invoke,
                event.at,
                Outcome::Succeeded,
                None,
            ),
            EventKind::StepFailed => close(
                &mut open,
                &mut done,
                step,
                Phase::Invoke,
                event.at,
                Outcome::Failed,
                error(),
            ),
            EventKind::StepCompensationSucceeded => close(
                &mut open,
                &mut done,
                step,
                Phase::Compensate,
                event.at,
                Outcome::Succeeded,
                None,
            ),
            EventKind::StepCompensationFailed => close(
                &mut open,
                &mut done,
                step,
                Phase::Compensate,
                event.at,
                Outcome::Failed,
                error(),
            ),
            // The worker that ran the open attempts is gone or gave them up.
            EventKind::LeaseTakenOver | EventKind::LeaseReleased => {
                for mut attempt in open.drain(..) {
                    attempt.end = event.at;
                    attempt.outcome = Outcome::Interrupted;
                    done.push(attempt);
                }
            }
            _ => {}
        }
    }
    for mut attempt in open {
        attempt.end = end_of_run.max(attempt.start);
        attempt.outcome = if run_over {
            Outcome::Interrupted
        } else {
            Outcome::Running
        };
        done.push(attempt);
    }
    done.sort_by_key(|a| a.start);
    done
}

/// A wait for a retry: from the failure to the time the next attempt was due.
#[derive(Debug, Clone, PartialEq)]
pub struct Wait {
    /// The step.
    pub step: String,
    /// When the retry was scheduled.
    pub from: DateTime<Utc>,
    /// When it was due.
    pub until: DateTime<Utc>,
}

/// The retry waits recorded in a run's log (`retry_scheduled` entries with their due time).
pub fn waits(events: &[EventRow]) -> Vec<Wait> {
    events
        .iter()
        .filter(|e| e.kind == EventKind::RetryScheduled)
        .filter_map(|e| {
            let until = e.detail.get("at")?.as_str()?;
            Some(Wait {
                step: e.step.clone()?,
                from: e.at,
                until: DateTime::parse_from_rfc3339(until).ok()?.with_timezone(&Utc),
            })
        })
        .collect()
}

/// Width of the whole chart, in SVG units.
pub const WIDTH: f64 = 960.0;
/// Room for the step names on the left.
pub const LABEL_WIDTH: f64 = 230.0;
const RIGHT_PAD: f64 = 16.0;
const TOP: f64 = 26.0;
const ROW: f64 = 24.0;
const BAR: f64 = 14.0;
/// Bars are at least this wide, so that instant attempts stay visible.
const MIN_BAR: f64 = 3.0;

/// A bar of the chart.
#[derive(Debug, Clone, PartialEq)]
pub struct Bar {
    /// Left edge.
    pub x: String,
    /// Top edge.
    pub y: String,
    /// Width.
    pub w: String,
    /// Height.
    pub h: String,
    /// CSS class: phase and outcome.
    pub class: &'static str,
    /// The tooltip: step, attempt, outcome, duration, error.
    pub title: String,
}

/// A retry wait's line.
#[derive(Debug, Clone, PartialEq)]
pub struct WaitLine {
    /// Start.
    pub x1: String,
    /// End.
    pub x2: String,
    /// Height (the row's middle).
    pub y: String,
    /// Tooltip.
    pub title: String,
}

/// A step's row.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Baseline of the label.
    pub text_y: String,
    /// Top of the row's guide line.
    pub line_y: String,
    /// The step's name.
    pub label: String,
}

/// A time mark on the axis.
#[derive(Debug, Clone, PartialEq)]
pub struct Tick {
    /// Position.
    pub x: String,
    /// Time since the run started.
    pub label: String,
}

/// The chart, ready for the template.
#[derive(Debug, Clone, PartialEq)]
pub struct Chart {
    /// Height of the SVG.
    pub height: String,
    /// The step rows.
    pub rows: Vec<Row>,
    /// The bars.
    pub bars: Vec<Bar>,
    /// The retry waits, as dashed lines.
    pub waits: Vec<WaitLine>,
    /// The axis marks.
    pub ticks: Vec<Tick>,
    /// Where the axis ends.
    pub right: String,
    /// Bottom of the tick lines.
    pub bottom: String,
    /// Bars left out (over the page's budget).
    pub omitted: usize,
}

fn num(v: f64) -> String {
    format!("{v:.1}")
}

/// Lays out the attempts of a run whose plan is `steps`, from `start` to `end`, drawing the
/// first `max_bars` (a run retried thousands of times stays a small page).
pub fn chart(
    steps: &[String],
    attempts: &[Attempt],
    waits: &[Wait],
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    max_bars: usize,
) -> Chart {
    let end = attempts.iter().map(|a| a.end).fold(end, DateTime::max);
    let span_ms = ((end - start).num_microseconds().unwrap_or(i64::MAX) as f64 / 1000.0).max(1.0);
    let plot = WIDTH - LABEL_WIDTH - RIGHT_PAD;
    let x_of = |at: DateTime<Utc>| {
        let ms = (at - start).num_microseconds().unwrap_or(0) as f64 / 1000.0;
        LABEL_WIDTH + (ms / span_ms).clamp(0.0, 1.0) * plot
    };
    let rows: Vec<Row> = steps
        .iter()
        .enumerate()
        .map(|(i, name)| Row {
            text_y: num(TOP + i as f64 * ROW + ROW / 2.0 + 4.0),
            line_y: num(TOP + i as f64 * ROW + ROW / 2.0),
            label: format::clip(name, 34),
        })
        .collect();
    let bars = attempts
        .iter()
        .take(max_bars)
        .filter_map(|a| {
            let row = steps.iter().position(|s| *s == a.step)?;
            let x = x_of(a.start);
            let w = (x_of(a.end) - x).max(MIN_BAR);
            let y = TOP + row as f64 * ROW + (ROW - BAR) / 2.0;
            let class = match (a.phase, a.outcome) {
                (Phase::Invoke, Outcome::Succeeded) => "bar ok",
                (Phase::Invoke, Outcome::Failed) => "bar failed",
                (Phase::Compensate, Outcome::Succeeded) => "bar comp",
                (Phase::Compensate, Outcome::Failed) => "bar comp-failed",
                (_, Outcome::Running) => "bar running",
                (_, Outcome::Interrupted) => "bar interrupted",
            };
            Some(Bar {
                x: num(x),
                y: num(y),
                w: num(w),
                h: num(BAR),
                class,
                title: describe(a),
            })
        })
        .collect();
    let wait_lines = waits
        .iter()
        .take(max_bars)
        .filter_map(|w| {
            let row = steps.iter().position(|s| *s == w.step)?;
            Some(WaitLine {
                x1: num(x_of(w.from)),
                x2: num(x_of(w.until)),
                y: num(TOP + row as f64 * ROW + ROW / 2.0),
                title: format!("{} · waiting {} to retry", w.step, format::between(w.from, w.until)),
            })
        })
        .collect();
    let ticks = tick_marks(span_ms)
        .into_iter()
        .map(|ms| Tick {
            x: num(LABEL_WIDTH + ms as f64 / span_ms * plot),
            label: format!("+{}", format::duration_ms(ms)),
        })
        .collect();
    let bottom = TOP + steps.len() as f64 * ROW;
    Chart {
        height: num(bottom + 6.0),
        rows,
        bars,
        waits: wait_lines,
        ticks,
        right: num(WIDTH - RIGHT_PAD),
        bottom: num(bottom),
        omitted: attempts.len().saturating_sub(max_bars),
    }
}

/// A bar's tooltip.
pub fn describe(a: &Attempt) -> String {
    let phase = match a.phase {
        Phase::Invoke => "attempt",
        Phase::Compensate => "compensation attempt",
    };
    let took = format::between(a.start, a.end);
    let outcome = match a.outcome {
        Outcome::Succeeded => format!("succeeded in {took}"),
        Outcome::Failed => format!("failed after {took}"),
        Outcome::Running => format!("running for {took}"),
        Outcome::Interrupted => format!("interrupted after {took} (its worker went away)"),
    };
    let mut text = format!("{} · {phase} {} · {outcome}", a.step, a.number);
    if let Some(error) = &a.error {
        text.push_str(": ");
        text.push_str(&format::clip(error, 200));
    }
    text
}

/// Round marks (1, 2 or 5 times a power of ten milliseconds), at most six, within `span_ms`.
pub fn tick_marks(span_ms: f64) -> Vec<i64> {
    let mut step: i64 = 1;
    'search: for power in 0..12 {
        for factor in [1, 2, 5] {
            step = factor * 10_i64.pow(power);
            if span_ms / step as f64 <= 5.0 {
                break 'search;
            }
        }
    }
    (0..)
        .map(|i| i * step)
        .take_while(|ms| *ms as f64 <= span_ms)
        .take(7)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;
    use serde_json::json;

    fn event(seq: i32, ms: i64, kind: EventKind, step: Option<&str>, attempt: Option<i32>, detail: Value) -> EventRow {
        let t0 = DateTime::from_timestamp(1_700_000_000, 0).expect("time");
        EventRow {
            seq,
            at: t0 + Duration::milliseconds(ms),
            kind,
            step: step.map(str::to_string),
            attempt,
            detail,
        }
    }

    #[test]
    fn attempts_and_compensations_become_bars() {
        use EventKind::*;
        let events = vec![
            event(1, 0, RunCreated, None, None, json!({})),
            event(2, 1, StepStarted, Some("a"), Some(1), json!({})),
            event(3, 11, StepSucceeded, Some("a"), Some(1), json!({})),
            event(4, 11, StepStarted, Some("b"), Some(1), json!({})),
            event(
                5,
                20,
                StepFailed,
                Some("b"),
                Some(1),
                json!({"error": "boom", "retryable": true}),
            ),
            event(
                6,
                20,
                RetryScheduled,
                Some("b"),
                Some(2),
                json!({"at": "2023-11-14T22:13:20.220Z"}),
            ),
            event(7, 220, StepStarted, Some("b"), Some(2), json!({})),
            event(8, 230, StepFailed, Some("b"), Some(2), json!({"error": "boom again"})),
            event(9, 230, CompensationStarted, None, None, json!({})),
            event(10, 231, StepCompensationStarted, Some("a"), Some(1), json!({})),
            event(11, 240, StepCompensationSucceeded, Some("a"), Some(1), json!({})),
            event(12, 240, RunCompensated, None, None, json!({})),
        ];
        let end = events[11].at;
        let got = attempts(&events, end, true);
        let summary: Vec<(&str, Phase, i32, Outcome, i64)> = got
            .iter()
            .map(|a| {
                (
                    a.step.as_str(),
                    a.phase,
                    a.number,
                    a.outcome,
                    (a.end - a.start).num_milliseconds(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("a", Phase::Invoke, 1, Outcome::Succeeded, 10),
                ("b", Phase::Invoke, 1, Outcome::Failed, 9),
                ("b", Phase::Invoke, 2, Outcome::Failed, 10),
                ("a", Phase::Compensate, 1, Outcome::Succeeded, 9),
            ]
        );
        assert_eq!(got[2].error.as_deref(), Some("boom again"));

        // To scale: the second attempt of b starts 220 ms into a 240 ms run.
        let steps = vec!["a".to_string(), "b".to_string(), "c".to_string()];
        let chart = chart(&steps, &got, &waits(&events), events[0].at, end, 100);
        assert_eq!(chart.bars.len(), 4);
        assert_eq!(chart.rows.len(), 3, "steps never reached still get a row");
        let x: f64 = chart.bars[2].x.parse().expect("number");
        let expected = LABEL_WIDTH + 220.0 / 240.0 * (WIDTH - LABEL_WIDTH - RIGHT_PAD);
        assert!((x - expected).abs() < 0.1, "{x} vs {expected}");
        assert_eq!(chart.bars[3].class, "bar comp");
        assert!(
            chart.bars[2]
                .title
                .contains("b · attempt 2 · failed after 10 ms: boom again")
        );
    }

    #[test]
    fn attempts_without_an_outcome_are_interrupted_or_running() {
        use EventKind::*;
        let events = vec![
            event(1, 0, StepStarted, Some("a"), Some(1), json!({})),
            event(2, 50, LeaseTakenOver, None, None, json!({"from": "w1"})),
            event(3, 51, StepStarted, Some("a"), Some(2), json!({})),
            event(4, 60, StepStarted, Some("a"), Some(3), json!({})),
        ];
        let now = events[3].at + Duration::milliseconds(5);
        let got = attempts(&events, now, false);
        let outcomes: Vec<Outcome> = got.iter().map(|a| a.outcome).collect();
        assert_eq!(outcomes, [Outcome::Interrupted, Outcome::Interrupted, Outcome::Running]);
        assert_eq!(got[2].end, now);
        // Once the run is over, what is still open was interrupted.
        let over = attempts(&events, now, true);
        assert_eq!(over[2].outcome, Outcome::Interrupted);
    }

    #[test]
    fn ticks_are_round_and_few() {
        assert_eq!(tick_marks(240.0), [0, 50, 100, 150, 200]);
        assert_eq!(tick_marks(1.0), [0, 1]);
        assert_eq!(tick_marks(7_000.0), [0, 2_000, 4_000, 6_000]);
        assert!(tick_marks(3_600_000.0).len() <= 7);
    }

    #[test]
    fn huge_logs_draw_a_bounded_number_of_bars() {
        use EventKind::*;
        let events: Vec<EventRow> = (0..2_000)
            .flat_map(|i| {
                [
                    event(2 * i + 1, i as i64 * 2, StepStarted, Some("a"), Some(i + 1), json!({})),
                    event(
                        2 * i + 2,
                        i as i64 * 2 + 1,
                        StepFailed,
                        Some("a"),
                        Some(i + 1),
                        json!({"error": "x"}),
                    ),
                ]
            })
            .collect();
        let got = attempts(&events, events[events.len() - 1].at, true);
        let chart = chart(
            &["a".to_string()],
            &got,
            &[],
            events[0].at,
            events[events.len() - 1].at,
            300,
        );
        assert_eq!(chart.bars.len(), 300);
        assert_eq!(chart.omitted, 2_000 - 300);
    }
}
