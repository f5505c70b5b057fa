//! The scheduler's decisions, pure: which ticks of a due schedule to fire under its catch-up
//! policy, and where its next tick lies after a change. No database, no clock: tests give
//! the times.

use std::collections::VecDeque;

use chrono::{DateTime, Duration, Utc};

use super::expr::CronExpr;
use super::{CatchUp, Overlap};

/// How far catching up goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CatchUpRules {
    /// A tick fired no later than this after its time is on time; later, it was missed (no
    /// instance was running, or none could reach the database).
    pub grace: Duration,
    /// `all` fires at most this many missed ticks (the most recent); older ones are skipped.
    pub limit: usize,
}

impl Default for CatchUpRules {
    fn default() -> Self {
        Self {
            grace: Duration::seconds(30),
            limit: 100,
        }
    }
}

/// What to do with a schedule whose next tick is due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Ticks to fire, oldest first.
    pub fire: Vec<DateTime<Utc>>,
    /// Missed ticks the catch-up policy leaves unfired: the first and the last of them.
    pub skipped: Option<(DateTime<Utc>, DateTime<Utc>)>,
    /// The first tick after now (None: the expression never fires again).
    pub next_fire_at: Option<DateTime<Utc>>,
}

/// Decides which ticks from `due_from` (the stored next tick) up to `now` to fire: those on
/// time, and as many missed ones as the policy wants, at most `rules.limit` in all (the most
/// recent).
pub fn plan(
    expr: &CronExpr,
    due_from: DateTime<Utc>,
    now: DateTime<Utc>,
    policy: CatchUp,
    rules: &CatchUpRules,
) -> Plan {
    if due_from > now {
        return Plan {
            fire: Vec::new(),
            skipped: None,
            next_fire_at: Some(due_from),
        };
    }
    let at_or_after = |t: DateTime<Utc>| expr.next_after(t - Duration::seconds(1));
    let cutoff = now - rules.grace;
    let limit = rules.limit.max(1);

    // On time: every tick within the grace period (normally just one).
    let mut on_time = VecDeque::new();
    let mut latest_dropped = None;
    let mut tick = at_or_after(due_from.max(cutoff));
    while let Some(t) = tick.filter(|t| *t <= now) {
        if on_time.len() == limit {
            latest_dropped = on_time.pop_front();
        }
        on_time.push_back(t);
        tick = expr.next_after(t);
    }

    // Missed: ticks from due_from to the cutoff, walked newest first and only as far as the
    // policy fires, so a month of an every-second schedule costs no more than a minute.
    let wanted = match policy {
        CatchUp::None => 0,
        CatchUp::Latest => 1,
        CatchUp::All => limit,
    }
    .min(limit - on_time.len());
    let mut missed = Vec::new();
    let mut latest_unfired = latest_dropped;
    if due_from < cutoff {
        let mut tick = expr.prev_before(cutoff).filter(|t| *t >= due_from);
        while let Some(t) = tick {
            if missed.len() == wanted {
                latest_unfired = latest_unfired.max(Some(t));
                break;
            }
            missed.push(t);
            tick = expr.prev_before(t).filter(|t| *t >= due_from);
        }
    }
    let skipped = latest_unfired.and_then(|last| Some((at_or_after(due_from)?, last)));
    missed.reverse();
    missed.extend(on_time);
    Plan {
        fire: missed,
        skipped,
        next_fire_at: expr.next_after(now),
    }
}

/// What a schedule's definition holds that decides its ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing<'a> {
    /// The expression as written.
    pub expression: &'a str,
    /// The IANA time zone.
    pub time_zone: &'a str,
    /// Whether it fires at all.
    pub enabled: bool,
}

/// A schedule's next tick after it was created, replaced, enabled or disabled. A change that
/// leaves its timing alone keeps the stored next tick, so a tick that fell due while no
/// instance ran is still caught up (declared schedules are upserted at every start); any
/// other change starts from the first tick after now: nothing from before it is fired.
pub fn next_fire_on_change(
    before: Option<(Timing<'_>, Option<DateTime<Utc>>)>,
    after: Timing<'_>,
    expr: &CronExpr,
    now: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    if !after.enabled {
        return None;
    }
    match before {
        Some((old, Some(next))) if old == after => Some(next),
        _ => expr.next_after(now),
    }
}

impl Overlap {
    /// Whether a tick may start a run while `in_flight` runs of the schedule are unfinished.
    pub fn allows(self, in_flight: bool) -> bool {
        match self {
            Self::Allow => true,
            Self::Skip => !in_flight,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::scheduler::expr::parse_time_zone;

    fn every_minute() -> CronExpr {
        CronExpr::parse("* * * * *", parse_time_zone("UTC").expect("zone")).expect("expression")
    }

    fn t(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).expect("time").with_timezone(&Utc)
    }

    fn rules(limit: usize) -> CatchUpRules {
        CatchUpRules {
            grace: Duration::seconds(30),
            limit,
        }
    }

    #[test]
    fn a_tick_due_now_fires_whatever_the_policy() {
        for policy in [CatchUp::None, CatchUp::Latest, CatchUp::All] {
            let p = plan(
                &every_minute(),
                t("2026-05-01T10:00:00Z"),
                t("2026-05-01T10:00:00.200Z"),
                policy,
                &rules(100),
            );
            assert_eq!(p.fire, [t("2026-05-01T10:00:00Z")], "{policy:?}");
            assert_eq!(p.skipped, None);
            assert_eq!(p.next_fire_at, Some(t("2026-05-01T10:01:00Z")));
        }
    }

    #[test]
    fn nothing_fires_before_the_next_tick() {
        let p = plan(
            &every_minute(),
            t("2026-05-01T10:01:00Z"),
            t("2026-05-01T10:00:59Z"),
            CatchUp::All,
            &rules(100),
        );
        assert!(p.fire.is_empty());
        assert_eq!(p.next_fire_at, Some(t("2026-05-01T10:01:00Z")));
    }

    #[test]
    fn after_downtime_each_policy_fires_what_it_promises() {
        // Down from 10:00 to 10:10:45: ticks 10:00 .. 10:10 were missed (10:10 by 45 s).
        let (from, now) = (t("2026-05-01T10:00:00Z"), t("2026-05-01T10:10:45Z"));
        let none = plan(&every_minute(), from, now, CatchUp::None, &rules(100));
        assert!(none.fire.is_empty());
        assert_eq!(
            none.skipped,
            Some((t("2026-05-01T10:00:00Z"), t("2026-05-01T10:10:00Z")))
        );
        assert_eq!(none.next_fire_at, Some(t("2026-05-01T10:11:00Z")));

        let latest = plan(&every_minute(), from, now, CatchUp::Latest, &rules(100));
        assert_eq!(latest.fire, [t("2026-05-01T10:10:00Z")]);
        assert_eq!(
            latest.skipped,
            Some((t("2026-05-01T10:00:00Z"), t("2026-05-01T10:09:00Z")))
        );

        let all = plan(&every_minute(), from, now, CatchUp::All, &rules(100));
        assert_eq!(all.fire.len(), 11);
        assert_eq!(all.fire.first(), Some(&t("2026-05-01T10:00:00Z")));
        assert_eq!(all.fire.last(), Some(&t("2026-05-01T10:10:00Z")));
        assert_eq!(all.skipped, None);

        let bounded = plan(&every_minute(), from, now, CatchUp::All, &rules(3));
        assert_eq!(
            bounded.fire,
            [
                t("2026-05-01T10:08:00Z"),
                t("2026-05-01T10:09:00Z"),
                t("2026-05-01T10:10:00Z")
            ]
        );
        assert_eq!(
            bounded.skipped,
            Some((t("2026-05-01T10:00:00Z"), t("2026-05-01T10:07:00Z")))
        );
    }

    #[test]
    fn ticks_within_the_grace_period_are_on_time_not_caught_up() {
        // Late by 45 s and by 5 s: the first was missed, the second is on time.
        let p = plan(
            &every_minute(),
            t("2026-05-01T10:00:00Z"),
            t("2026-05-01T10:01:05Z"),
            CatchUp::None,
            &rules(100),
        );
        assert_eq!(p.fire, [t("2026-05-01T10:01:00Z")]);
        assert_eq!(p.skipped, Some((t("2026-05-01T10:00:00Z"), t("2026-05-01T10:00:00Z"))));
    }

    #[test]
    fn a_long_downtime_of_an_every_second_schedule_is_planned_without_walking_it() {
        let every_second = CronExpr::parse("* * * * * *", parse_time_zone("UTC").expect("zone")).expect("expression");
        let started = std::time::Instant::now();
        let p = plan(
            &every_second,
            t("2026-01-01T00:00:00Z"),
            t("2026-03-01T00:00:00Z"),
            CatchUp::All,
            &rules(40),
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
        // The 31 ticks within the grace period are on time; nine missed ones fill the bound.
        assert_eq!(p.fire.len(), 40);
        assert_eq!(p.fire.first(), Some(&t("2026-02-28T23:59:21Z")));
        assert_eq!(p.fire.last(), Some(&t("2026-03-01T00:00:00Z")));
        assert_eq!(p.skipped, Some((t("2026-01-01T00:00:00Z"), t("2026-02-28T23:59:20Z"))));
        // A bound smaller than the grace period keeps the most recent on-time ticks.
        let small = plan(
            &every_second,
            t("2026-02-28T23:00:00Z"),
            t("2026-03-01T00:00:00Z"),
            CatchUp::All,
            &rules(3),
        );
        assert_eq!(small.fire.first(), Some(&t("2026-02-28T23:59:58Z")));
        assert_eq!(
            small.skipped,
            Some((t("2026-02-28T23:00:00Z"), t("2026-02-28T23:59:57Z")))
        );
    }

    #[test]
    fn only_a_change_of_timing_moves_the_next_tick() {
        let expr = every_minute();
        let now = t("2026-05-01T10:00:30Z");
        let timing = Timing {
            expression: "* * * * *",
            time_zone: "UTC",
            enabled: true,
        };
        let stored = Some(t("2026-05-01T09:00:00Z"));
        assert_eq!(next_fire_on_change(Some((timing, stored)), timing, &expr, now), stored);
        let moved = Timing {
            time_zone: "Europe/Paris",
            ..timing
        };
        assert_eq!(
            next_fire_on_change(Some((timing, stored)), moved, &expr, now),
            Some(t("2026-05-01T10:01:00Z"))
        );
        let disabled = Timing {
            enabled: false,
            ..timing
        };
        assert_eq!(next_fire_on_change(Some((timing, stored)), disabled, &expr, now), None);
        // Enabling again starts afresh: the disabled time is not caught up.
        assert_eq!(
            next_fire_on_change(Some((disabled, None)), timing, &expr, now),
            Some(t("2026-05-01T10:01:00Z"))
        );
        assert_eq!(
            next_fire_on_change(None, timing, &expr, now),
            Some(t("2026-05-01T10:01:00Z"))
        );
    }

    #[test]
    fn overlap_skip_refuses_only_while_a_run_is_in_flight() {
        assert!(Overlap::Allow.allows(true));
        assert!(Overlap::Skip.allows(false));
        assert!(!Overlap::Skip.allows(true));
    }
}
