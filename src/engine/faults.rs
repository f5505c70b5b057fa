//! Fault injection, for testing only: `SAGAFLOW_FAULTS` aborts the process (like SIGKILL) at
//! precise points of a step, or makes a step fail, so crash tests can hit every point.
//!
//! Syntax: a comma list of `POINT:STEP[:N]`.
//! - `before:STEP` aborts once the attempt is recorded as started, before the step runs.
//! - `after-effect:STEP` aborts after the step did its work, before its outcome commits (for
//!   a step that waits: once the signal or completion it waits for was taken from the run's
//!   inbox, before its consumption commits).
//! - `after-commit:STEP` aborts right after the outcome of the step's attempt committed.
//! - `compensate:STEP` aborts after the step's compensation did its work, before it commits.
//! - `fail:STEP` makes the step return a retryable error instead of running.
//!
//! The process aborts the N-th time (default: the first) that point is reached for that
//! step in this process; `fail` fails the first N times.
//!
//! In a fused segment (local steps sharing one transaction) `after-commit:STEP` strikes
//! once the segment that recorded the step's outcome committed, and a step with a `fail`
//! pending runs alone, so its failure is recorded.

use std::collections::HashMap;
use std::sync::Mutex;

/// Where in a step a fault strikes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultPoint {
    /// After the attempt was recorded as started, before the step's code runs.
    Before,
    /// After the step's code succeeded, before its outcome (and its writes) commit.
    AfterEffect,
    /// Right after the attempt's outcome committed.
    AfterCommit,
    /// After a compensation's code succeeded, before it commits.
    Compensate,
    /// Instead of running the step: a retryable failure.
    Fail,
}

impl FaultPoint {
    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "before" => Self::Before,
            "after-effect" => Self::AfterEffect,
            "after-commit" => Self::AfterCommit,
            "compensate" => Self::Compensate,
            "fail" => Self::Fail,
            _ => return None,
        })
    }
}

/// A `SAGAFLOW_FAULTS` value that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid SAGAFLOW_FAULTS entry `{0}`: expected POINT:STEP[:N] with POINT one of before, after-effect, \
     after-commit, compensate, fail and N a positive number"
)]
pub struct FaultsParseError(pub String);

#[derive(Debug)]
struct Rule {
    point: FaultPoint,
    step: String,
    n: u32,
}

/// The configured faults and how often each point was reached.
#[derive(Debug, Default)]
pub struct Faults {
    rules: Vec<Rule>,
    reached: Mutex<HashMap<(FaultPoint, String), u32>>,
}

impl Faults {
    /// No faults (production).
    pub fn none() -> Self {
        Self::default()
    }

    /// Parses a `SAGAFLOW_FAULTS` value.
    pub fn parse(spec: &str) -> Result<Self, FaultsParseError> {
        let mut rules = Vec::new();
        for entry in spec.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let bad = || FaultsParseError(entry.to_string());
            let mut parts = entry.split(':');
            let point = parts.next().and_then(FaultPoint::parse).ok_or_else(bad)?;
            let step = parts.next().filter(|s| !s.is_empty()).ok_or_else(bad)?.to_string();
            let n = match parts.next() {
                None => 1,
                Some(n) => n.parse::<u32>().ok().filter(|n| *n > 0).ok_or_else(bad)?,
            };
            if parts.next().is_some() {
                return Err(bad());
            }
            rules.push(Rule { point, step, n });
        }
        Ok(Self {
            rules,
            reached: Mutex::new(HashMap::new()),
        })
    }

    /// Whether any fault is configured.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Counts a visit of `point` for `step`; true when a rule says this visit strikes.
    fn strikes(&self, point: FaultPoint, step: &str) -> bool {
        let relevant: Vec<&Rule> = self
            .rules
            .iter()
            .filter(|r| r.point == point && r.step == step)
            .collect();
        if relevant.is_empty() {
            return false;
        }
        let mut reached = match self.reached.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        let count = reached.entry((point, step.to_string())).or_insert(0);
        *count += 1;
        let count = *count;
        relevant.iter().any(|r| match point {
            FaultPoint::Fail => count <= r.n,
            _ => count == r.n,
        })
    }

    /// Aborts the process if a rule says so for this visit of `point` in `step`.
    pub fn checkpoint(&self, point: FaultPoint, step: &str) {
        if point != FaultPoint::Fail && self.strikes(point, step) {
            // Straight to stderr: the log's writer thread would not get to a queued line
            // before the abort.
            eprintln!("SAGAFLOW_FAULTS: aborting the process at {point:?} in {step}");
            std::process::abort();
        }
    }

    /// Whether this attempt of `step` must fail instead of running (`fail:STEP:N`).
    pub fn should_fail(&self, step: &str) -> bool {
        self.strikes(FaultPoint::Fail, step)
    }

    /// Whether the next attempt of `step` would fail (`should_fail`), without counting it: a
    /// fused segment ends before such a step, so that the injected failure is recorded as an
    /// attempt of its own instead of rolling back the segment.
    pub fn will_fail(&self, step: &str) -> bool {
        let reached = match self.reached.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        let count = reached.get(&(FaultPoint::Fail, step.to_string())).copied().unwrap_or(0);
        self.rules
            .iter()
            .any(|r| r.point == FaultPoint::Fail && r.step == step && count < r.n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_points_steps_and_counts() {
        let faults = Faults::parse("before:a, after-effect:b:2,fail:c:3").expect("valid");
        assert_eq!(faults.rules.len(), 3);
        assert_eq!(faults.rules[1].point, FaultPoint::AfterEffect);
        assert_eq!(faults.rules[1].n, 2);
        assert!(Faults::parse("").expect("empty is valid").is_empty());
    }

    #[test]
    fn rejects_malformed_entries() {
        for bad in [
            "explode:a",
            "before",
            "before:",
            "before:a:0",
            "before:a:x",
            "before:a:1:2",
        ] {
            assert_eq!(
                Faults::parse(bad).err(),
                Some(FaultsParseError(bad.to_string())),
                "{bad}"
            );
        }
    }

    #[test]
    fn fail_strikes_the_first_n_visits() {
        let faults = Faults::parse("fail:a:2").expect("valid");
        let hits: Vec<bool> = (0..4).map(|_| faults.should_fail("a")).collect();
        assert_eq!(hits, [true, true, false, false]);
        assert!(!faults.should_fail("b"));
    }

    #[test]
    fn abort_points_strike_exactly_the_nth_visit() {
        let faults = Faults::parse("after-commit:a:3").expect("valid");
        let hits: Vec<bool> = (0..4).map(|_| faults.strikes(FaultPoint::AfterCommit, "a")).collect();
        assert_eq!(hits, [false, false, true, false]);
    }
}
