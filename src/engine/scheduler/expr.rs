//! Cron expressions in a time zone: parsing, and the tick after (or before) an instant.
//!
//! Two forms are accepted:
//! - **crontab**, five fields `minute hour day-of-month month day-of-week`, with crontab's
//!   meaning: days of the week 0-7 (0 and 7 are Sunday) or names, and when both day fields
//!   are restricted a day matching *either* fires (the `cron` crate alone would need both);
//! - the **`cron` crate's** six or seven fields, seconds first and an optional year, with its
//!   meaning (days of the week 1-7 from Sunday, or names; both day fields must match), and its
//!   shorthands `@hourly`, `@daily`, `@weekly`, `@monthly`, `@yearly`.
//!
//! Ticks are wall-clock times of the schedule's time zone. On the days clocks change:
//! - a wall-clock time that does not exist (spring forward) fires at the instant the clock
//!   would have shown it had it not jumped (02:30 in a 02:00→03:00 gap fires at 03:30), and a
//!   tick that lands on an instant already fired is not fired again;
//! - a wall-clock time that happens twice (fall back) fires once, at its first occurrence,
//!   unless the expression fires every hour: then it fires in both, as elapsed time goes on.
//!
//! The `cron` crate's own iterator, given a time zone, skips nonexistent times and is not
//! monotonic across a fall-back hour; so we walk its matches in wall-clock time (as if UTC,
//! where nothing is skipped or repeated) and map each to instants ourselves.

use std::str::FromStr;

use chrono::{DateTime, Duration, LocalResult, NaiveDateTime, Offset, TimeZone, Timelike, Utc};
use chrono_tz::Tz;
use cron::{Schedule, TimeUnitSpec};

/// How many wall-clock matches one search may visit: far more than any real expression needs
/// (an every-second schedule near a fall-back hour visits a few thousand), so a search always
/// ends.
const MAX_STEPS: usize = 200_000;

/// Why an expression or a time zone was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExprError {
    /// The expression does not parse; the message is the parser's.
    #[error("invalid cron expression `{expression}`: {message}")]
    Expression {
        /// The expression as given.
        expression: String,
        /// What is wrong with it.
        message: String,
    },
    /// The time zone is not in the IANA database.
    #[error("`{zone}` is not an IANA time zone such as `Europe/Paris` ({message})")]
    TimeZone {
        /// The zone as given.
        zone: String,
        /// The parser's message.
        message: String,
    },
}

/// Parses an IANA time zone name (`UTC`, `Europe/Paris`, `America/New_York`).
pub fn parse_time_zone(zone: &str) -> Result<Tz, ExprError> {
    Tz::from_str(zone.trim()).map_err(|e| ExprError::TimeZone {
        zone: zone.to_string(),
        message: e.to_string(),
    })
}

/// The syntax an expression was written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// Five crontab fields.
    Crontab,
    /// The `cron` crate's fields, seconds first, or one of its shorthands.
    WithSeconds,
}

/// A parsed cron expression and its time zone.
#[derive(Debug, Clone)]
pub struct CronExpr {
    source: String,
    form: Form,
    tz: Tz,
    /// The schedule; two when a crontab restricts both day fields (a tick of either fires).
    schedules: Vec<Schedule>,
    /// Every hour matches: the repeated hour of a fall-back fires twice.
    every_hour: bool,
}

impl CronExpr {
    /// Parses `expression` (five crontab fields, or six or seven with seconds first) for the
    /// time zone `tz`.
    pub fn parse(expression: &str, tz: Tz) -> Result<Self, ExprError> {
        let source = expression.trim().to_string();
        let refuse = |message: String| ExprError::Expression {
            expression: expression.to_string(),
            message,
        };
        let fields: Vec<&str> = source.split_whitespace().collect();
        out_of_range(&fields).map_or(Ok(()), |message| Err(refuse(message)))?;
        let (form, texts) = match fields.len() {
            1 if source.starts_with('@') => (Form::WithSeconds, vec![shorthand(&source).map_err(refuse)?]),
            5 => (Form::Crontab, crontab(&fields).map_err(refuse)?),
            6 | 7 => (Form::WithSeconds, vec![source.clone()]),
            n => {
                return Err(refuse(format!(
                    "expected 5 fields (minute hour day-of-month month day-of-week) or 6 to 7 with \
                     seconds first (second minute hour day-of-month month day-of-week [year]), got {n}"
                )));
            }
        };
        let schedules = texts
            .iter()
            .map(|text| Schedule::from_str(text).map_err(|e| refuse(crate_message(&e.to_string()))))
            .collect::<Result<Vec<_>, _>>()?;
        let every_hour = schedules.first().is_some_and(|s| s.hours().is_all());
        Ok(Self {
            source,
            form,
            tz,
            schedules,
            every_hour,
        })
    }

    /// The expression as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The syntax it was written in.
    pub fn form(&self) -> Form {
        self.form
    }

    /// Its time zone.
    pub fn time_zone(&self) -> Tz {
        self.tz
    }

    /// The parsed schedules (two for a crontab restricting both day fields: either fires).
    pub(crate) fn schedules(&self) -> &[Schedule] {
        &self.schedules
    }

    /// The first tick strictly after `t`, if the expression ever fires again.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let t = floor_second(t);
        let here = self.offset_at(t);
        // A fall-back within the next day repeats wall-clock times: ticks whose wall clock is
        // before ours may still be ahead in time.
        let slack = (here - self.offset_at(t + Duration::days(1))).max(Duration::zero());
        let mut cursor = t.naive_utc() + here - slack;
        let mut best: Option<DateTime<Utc>> = None;
        for _ in 0..MAX_STEPS {
            let Some(local) = self.local_after(cursor) else { break };
            if let Some(b) = best
                && local > self.wall_clock(b) + slack
            {
                break;
            }
            for s in self.instants(local).into_iter().flatten() {
                if s > t && best.is_none_or(|b| s < b) {
                    best = Some(s);
                }
            }
            if best.is_some() && slack.is_zero() {
                break;
            }
            cursor = local;
        }
        best
    }

    /// The last tick strictly before `t`.
    pub fn prev_before(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let t = ceil_second(t);
        let here = self.offset_at(t);
        // A fall-back within the past day: ticks whose wall clock is after ours may be behind.
        let slack = (self.offset_at(t - Duration::days(1)) - here).max(Duration::zero());
        let mut cursor = t.naive_utc() + here + slack;
        let mut best: Option<DateTime<Utc>> = None;
        for _ in 0..MAX_STEPS {
            let Some(local) = self.local_before(cursor) else { break };
            if let Some(b) = best
                && local < self.wall_clock(b) - slack
            {
                break;
            }
            for s in self.instants(local).into_iter().flatten() {
                if s < t && best.is_none_or(|b| s > b) {
                    best = Some(s);
                }
            }
            if best.is_some() && slack.is_zero() {
                break;
            }
            cursor = local;
        }
        best
    }

    /// The next `n` ticks after `t`.
    pub fn upcoming(&self, t: DateTime<Utc>, n: usize) -> Vec<DateTime<Utc>> {
        let mut ticks = Vec::with_capacity(n);
        let mut at = t;
        while ticks.len() < n {
            match self.next_after(at) {
                Some(tick) => {
                    ticks.push(tick);
                    at = tick;
                }
                None => break,
            }
        }
        ticks
    }

    /// The UTC offset in force at `t`.
    fn offset_at(&self, t: DateTime<Utc>) -> Duration {
        let seconds = self.tz.offset_from_utc_datetime(&t.naive_utc()).fix().local_minus_utc();
        Duration::seconds(i64::from(seconds))
    }

    /// What the schedule's wall clock shows at `t`.
    fn wall_clock(&self, t: DateTime<Utc>) -> NaiveDateTime {
        t.naive_utc() + self.offset_at(t)
    }

    /// The first wall-clock match strictly after `local`.
    fn local_after(&self, local: NaiveDateTime) -> Option<NaiveDateTime> {
        let from = Utc.from_utc_datetime(&local);
        self.schedules
            .iter()
            .filter_map(|s| s.after(&from).next())
            .min()
            .map(|t| t.naive_utc())
    }

    /// The last wall-clock match strictly before `local`.
    fn local_before(&self, local: NaiveDateTime) -> Option<NaiveDateTime> {
        let from = Utc.from_utc_datetime(&local);
        self.schedules
            .iter()
            .filter_map(|s| s.after(&from).next_back())
            .max()
            .map(|t| t.naive_utc())
    }

    /// The instants a wall-clock match fires at (none, one, or two in a fall-back hour).
    fn instants(&self, local: NaiveDateTime) -> [Option<DateTime<Utc>>; 2] {
        match self.tz.from_local_datetime(&local) {
            LocalResult::Single(t) => [Some(t.with_timezone(&Utc)), None],
            LocalResult::Ambiguous(first, second) => [
                Some(first.with_timezone(&Utc)),
                self.every_hour.then(|| second.with_timezone(&Utc)),
            ],
            LocalResult::None => {
                // Skipped by a spring-forward: read it with the offset in force before the
                // jump, which lands as far after the jump as it was into the gap.
                let before = Utc.from_utc_datetime(&local) - Duration::days(1);
                let offset = self.offset_at(before);
                [Some(Utc.from_utc_datetime(&(local - offset))), None]
            }
        }
    }
}

fn floor_second(t: DateTime<Utc>) -> DateTime<Utc> {
    t.with_nanosecond(0).unwrap_or(t)
}

fn ceil_second(t: DateTime<Utc>) -> DateTime<Utc> {
    let floor = floor_second(t);
    if floor == t { t } else { floor + Duration::seconds(1) }
}

/// The first number of an expression outside its field's range, said in our words (the cron
/// crate's own message is off by one: "Minutes must be less than 59" for 61). Step values
/// (after `/`) and names (`MON`, `JAN`) are left to the parser.
fn out_of_range(fields: &[&str]) -> Option<String> {
    const CRONTAB: [(&str, u32, u32); 5] = [
        ("minute", 0, 59),
        ("hour", 0, 23),
        ("day of the month", 1, 31),
        ("month", 1, 12),
        ("day of the week", 0, 7),
    ];
    const WITH_SECONDS: [(&str, u32, u32); 7] = [
        ("second", 0, 59),
        ("minute", 0, 59),
        ("hour", 0, 23),
        ("day of the month", 1, 31),
        ("month", 1, 12),
        ("day of the week", 1, 7),
        ("year", 1970, 2100),
    ];
    let ranges: &[(&str, u32, u32)] = match fields.len() {
        5 => &CRONTAB,
        6 | 7 => &WITH_SECONDS,
        _ => return None,
    };
    for (field, &(name, low, high)) in fields.iter().zip(ranges) {
        for part in field.split(',') {
            let values = part.split('/').next().unwrap_or_default();
            for number in values.split('-') {
                let Ok(value) = number.parse::<u64>() else { continue };
                if value < u64::from(low) || value > u64::from(high) {
                    return Some(format!(
                        "the {name} field is {value}, outside {low} to {high} (in `{field}`)"
                    ));
                }
            }
        }
    }
    None
}

/// The `cron` crate's message without its echo of the expression it parsed (ours may differ
/// from what the user wrote: crontab is translated) and caret; when it has no explanation,
/// where the caret pointed.
fn crate_message(message: &str) -> String {
    let lines: Vec<&str> = message.lines().collect();
    let Some(caret) = lines.iter().position(|l| l.trim() == "^") else {
        let text = message.trim();
        return if text.is_empty() {
            "it could not be parsed".to_string()
        } else {
            text.to_string()
        };
    };
    let explanation: Vec<&str> = lines[caret + 1..]
        .iter()
        .map(|l| l.trim())
        .filter(|l| !l.is_empty())
        .collect();
    if !explanation.is_empty() {
        return explanation.join(" ");
    }
    let column = lines[caret].find('^').unwrap_or(0);
    let near = caret
        .checked_sub(1)
        .and_then(|echo| lines[echo].get(column..))
        .and_then(|rest| rest.split_whitespace().next());
    match near {
        Some(token) => format!("it could not be parsed at `{token}`"),
        None => "it could not be parsed".to_string(),
    }
}

fn shorthand(text: &str) -> Result<String, String> {
    match text.to_ascii_lowercase().as_str() {
        "@yearly" | "@annually" => Ok("@yearly".into()),
        "@monthly" => Ok("@monthly".into()),
        "@weekly" => Ok("@weekly".into()),
        "@daily" | "@midnight" => Ok("@daily".into()),
        "@hourly" => Ok("@hourly".into()),
        other => Err(format!(
            "unknown shorthand `{other}`; use @hourly, @daily, @weekly, @monthly or @yearly"
        )),
    }
}

/// Translates five crontab fields into the `cron` crate's syntax: seconds `0`, days of the
/// week as names, and two schedules when both day fields are restricted (crontab fires on a
/// day matching either; a field starting with `*` counts as unrestricted, as in crontab).
fn crontab(fields: &[&str]) -> Result<Vec<String>, String> {
    let [minute, hour, dom, month, dow] = fields else {
        return Err("expected five fields".into());
    };
    let days = crontab_days_of_week(dow)?;
    let dom_restricted = !dom.starts_with('*') && *dom != "?";
    let dow_restricted = !dow.starts_with('*') && *dow != "?";
    Ok(if dom_restricted && dow_restricted {
        vec![
            format!("0 {minute} {hour} {dom} {month} *"),
            format!("0 {minute} {hour} * {month} {days}"),
        ]
    } else {
        vec![format!("0 {minute} {hour} {dom} {month} {days}")]
    })
}

const DAY_NAMES: [&str; 7] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];

/// Crontab's day-of-week field (0-7, Sunday is 0 and 7, or names; lists, ranges, steps) as a
/// list of day names.
fn crontab_days_of_week(field: &str) -> Result<String, String> {
    if field == "*" || field == "?" {
        return Ok(field.to_string());
    }
    let mut days = [false; 7];
    for item in field.split(',') {
        let bad = |why: &str| format!("day of week `{item}`: {why}");
        let (range, step) = match item.split_once('/') {
            Some((range, step)) => {
                let step: u32 = step
                    .parse()
                    .ok()
                    .filter(|s| *s > 0)
                    .ok_or_else(|| bad("the step must be a positive number"))?;
                (range, step)
            }
            None => (item, 1),
        };
        let (start, end) = match range.split_once('-') {
            _ if range == "*" => (0, 7),
            Some((a, b)) => (
                day_number(a).ok_or_else(|| bad("unknown day"))?,
                day_number(b).ok_or_else(|| bad("unknown day"))?,
            ),
            // `N/S` runs from N to the end of the week.
            None if step > 1 => (day_number(range).ok_or_else(|| bad("unknown day"))?, 7),
            None => {
                let day = day_number(range).ok_or_else(|| bad("unknown day"))?;
                (day, day)
            }
        };
        if start > end {
            return Err(bad("the range runs backwards"));
        }
        for day in (start..=end).step_by(step as usize) {
            days[(day % 7) as usize] = true;
        }
    }
    Ok(DAY_NAMES
        .iter()
        .zip(days)
        .filter(|(_, on)| *on)
        .map(|(name, _)| *name)
        .collect::<Vec<_>>()
        .join(","))
}

/// A crontab day of the week: 0-7 (Sunday is 0 and 7) or a name (`mon`, `Monday`).
fn day_number(text: &str) -> Option<u32> {
    const NAMES: [&[&str]; 7] = [
        &["sun", "sunday"],
        &["mon", "monday"],
        &["tue", "tues", "tuesday"],
        &["wed", "wednesday"],
        &["thu", "thurs", "thursday"],
        &["fri", "friday"],
        &["sat", "saturday"],
    ];
    if let Ok(n) = text.parse::<u32>() {
        return (n <= 7).then_some(n);
    }
    let lower = text.to_ascii_lowercase();
    NAMES
        .iter()
        .position(|names| names.contains(&lower.as_str()))
        .and_then(|i| u32::try_from(i).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tz(name: &str) -> Tz {
        parse_time_zone(name).expect("zone")
    }

    fn expr(text: &str, zone: &str) -> CronExpr {
        CronExpr::parse(text, tz(zone)).expect("expression")
    }

    fn utc(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).expect("time").with_timezone(&Utc)
    }

    fn ticks(e: &CronExpr, from: &str, n: usize) -> Vec<String> {
        e.upcoming(utc(from), n)
            .into_iter()
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
            .collect()
    }

    #[test]
    fn a_number_outside_its_field_is_refused_naming_the_field_and_the_range() {
        let refused = |expression: &str| match CronExpr::parse(expression, chrono_tz::UTC) {
            Err(ExprError::Expression { message, .. }) => message,
            other => panic!("{expression}: {other:?}"),
        };
        assert_eq!(
            refused("61 * * * *"),
            "the minute field is 61, outside 0 to 59 (in `61`)"
        );
        assert_eq!(
            refused("0 9-24 * * *"),
            "the hour field is 24, outside 0 to 23 (in `9-24`)"
        );
        assert_eq!(
            refused("0 0 0 * *"),
            "the day of the month field is 0, outside 1 to 31 (in `0`)"
        );
        assert_eq!(
            refused("0 0 1 1,13 *"),
            "the month field is 13, outside 1 to 12 (in `1,13`)"
        );
        assert_eq!(
            refused("60 * * * * *"),
            "the second field is 60, outside 0 to 59 (in `60`)"
        );
        for fine in ["*/15 * * * *", "0 9-17 * * MON-FRI", "59 23 31 12 7", "0 0 1 JAN *"] {
            assert!(CronExpr::parse(fine, chrono_tz::UTC).is_ok(), "{fine}");
        }
    }

    #[test]
    fn five_fields_are_crontab_and_six_have_seconds() {
        let daily = expr("30 9 * * *", "UTC");
        assert_eq!(daily.form(), Form::Crontab);
        assert_eq!(
            ticks(&daily, "2026-03-01T09:30:00Z", 2),
            ["2026-03-02T09:30:00Z", "2026-03-03T09:30:00Z"]
        );
        let every_second = expr("* * * * * *", "UTC");
        assert_eq!(
            ticks(&every_second, "2026-03-01T09:30:00.250Z", 3),
            ["2026-03-01T09:30:01Z", "2026-03-01T09:30:02Z", "2026-03-01T09:30:03Z"]
        );
        let with_year = expr("0 0 12 1 1 * 2030", "UTC");
        assert_eq!(ticks(&with_year, "2026-01-01T00:00:00Z", 2), ["2030-01-01T12:00:00Z"]);
        assert_eq!(
            ticks(&expr("@daily", "UTC"), "2026-01-01T10:00:00Z", 1),
            ["2026-01-02T00:00:00Z"]
        );
    }

    #[test]
    fn crontab_days_of_week_count_from_sunday_zero() {
        // 2026-03-02 is a Monday.
        let weekdays = expr("0 8 * * 1-5", "UTC");
        assert_eq!(
            ticks(&weekdays, "2026-02-28T00:00:00Z", 6),
            [
                "2026-03-02T08:00:00Z",
                "2026-03-03T08:00:00Z",
                "2026-03-04T08:00:00Z",
                "2026-03-05T08:00:00Z",
                "2026-03-06T08:00:00Z",
                "2026-03-09T08:00:00Z"
            ]
        );
        for sunday in ["0 8 * * 0", "0 8 * * 7", "0 8 * * sun", "0 8 * * Sunday"] {
            assert_eq!(
                ticks(&expr(sunday, "UTC"), "2026-03-02T00:00:00Z", 1),
                ["2026-03-08T08:00:00Z"],
                "{sunday}"
            );
        }
        assert_eq!(crontab_days_of_week("*/2"), Ok("SUN,TUE,THU,SAT".into()));
        assert_eq!(crontab_days_of_week("1-5/2,0"), Ok("SUN,MON,WED,FRI".into()));
        assert_eq!(crontab_days_of_week("5/1"), Ok("FRI".into()));
        assert_eq!(crontab_days_of_week("5/2"), Ok("SUN,FRI".into()));
        assert!(crontab_days_of_week("5-1").is_err());
        assert!(crontab_days_of_week("8").is_err());
        assert!(crontab_days_of_week("funday").is_err());
        assert!(crontab_days_of_week("1/0").is_err());
    }

    #[test]
    fn crontab_fires_on_either_restricted_day_field() {
        // The 13th, or any Friday: 2026-03-06 and 13 are Fridays; 2026-03-13 counts once.
        let e = expr("0 0 13 * 5", "UTC");
        assert_eq!(
            ticks(&e, "2026-03-01T00:00:00Z", 4),
            [
                "2026-03-06T00:00:00Z",
                "2026-03-13T00:00:00Z",
                "2026-03-20T00:00:00Z",
                "2026-03-27T00:00:00Z"
            ]
        );
        assert_eq!(
            e.prev_before(utc("2026-03-20T00:00:00Z")),
            Some(utc("2026-03-13T00:00:00Z"))
        );
        // A star-led field is unrestricted, as in crontab.
        assert_eq!(expr("0 0 13 * */1", "UTC").schedules().len(), 1);
    }

    #[test]
    fn bad_expressions_and_zones_carry_the_parsers_message() {
        let message = |text: &str| match CronExpr::parse(text, Tz::UTC) {
            Err(ExprError::Expression { message, .. }) => message,
            other => panic!("{text}: expected a refusal, got {other:?}"),
        };
        assert!(message("* * *").contains("got 3"));
        assert!(
            message("0 0 * * 9").contains("day of the week"),
            "{}",
            message("0 0 * * 9")
        );
        assert!(message("@fortnightly").contains("unknown shorthand"));
        assert!(!message("x y z a b c").contains('^'));
        assert_eq!(
            message("0 0 0 1 1 * 1969"),
            "the year field is 1969, outside 1970 to 2100 (in `1969`)"
        );
        assert_eq!(message("0 0 0 1 1 * 19x9"), "it could not be parsed at `19x9`");
        assert_eq!(message("*/0 * * * *"), "range step cannot be zero");
        // Odd input is refused, never a panic.
        for odd in [
            "99999999999 * * * *",
            "0,,1 * * * *",
            "- * * * *",
            "0 0 0 1 1 * 2100/0",
            "1-2-3 * * * *",
        ] {
            assert!(!message(odd).is_empty(), "{odd}");
        }
        let zone = parse_time_zone("Mars/Olympus_Mons");
        assert!(matches!(zone, Err(ExprError::TimeZone { ref message, .. }) if message.contains("parse")));
    }

    #[test]
    fn ticks_follow_the_time_zone() {
        let e = expr("0 9 * * *", "Europe/Paris");
        // Winter: UTC+1; summer: UTC+2.
        assert_eq!(ticks(&e, "2026-01-10T00:00:00Z", 1), ["2026-01-10T08:00:00Z"]);
        assert_eq!(ticks(&e, "2026-07-10T00:00:00Z", 1), ["2026-07-10T07:00:00Z"]);
        let kolkata = expr("0 * * * *", "Asia/Kolkata");
        assert_eq!(
            ticks(&kolkata, "2026-01-10T00:00:00Z", 2),
            ["2026-01-10T00:30:00Z", "2026-01-10T01:30:00Z"]
        );
    }

    #[test]
    fn a_daily_time_in_the_spring_forward_gap_fires_after_the_jump() {
        // New York, 2026-03-08: 02:00 EST becomes 03:00 EDT; 02:30 does not exist.
        let e = expr("30 2 * * *", "America/New_York");
        assert_eq!(
            ticks(&e, "2026-03-07T00:00:00Z", 3),
            [
                "2026-03-07T07:30:00Z", // 02:30 EST
                "2026-03-08T07:30:00Z", // "02:30" read as EST: 03:30 EDT
                "2026-03-09T06:30:00Z", // 02:30 EDT
            ]
        );
        assert_eq!(
            e.prev_before(utc("2026-03-09T06:30:00Z")),
            Some(utc("2026-03-08T07:30:00Z"))
        );
    }

    #[test]
    fn sub_hourly_ticks_skip_the_missing_hour_without_repeating() {
        let e = expr("*/30 * * * *", "America/New_York");
        assert_eq!(
            ticks(&e, "2026-03-08T06:00:00Z", 4),
            [
                "2026-03-08T06:30:00Z", // 01:30 EST
                "2026-03-08T07:00:00Z", // 03:00 EDT (02:00 maps here too: fired once)
                "2026-03-08T07:30:00Z", // 03:30 EDT
                "2026-03-08T08:00:00Z",
            ]
        );
    }

    #[test]
    fn a_daily_time_in_the_fall_back_hour_fires_once() {
        // New York, 2026-11-01: 02:00 EDT becomes 01:00 EST; 01:30 happens twice.
        let e = expr("30 1 * * *", "America/New_York");
        assert_eq!(
            ticks(&e, "2026-10-31T12:00:00Z", 2),
            ["2026-11-01T05:30:00Z", "2026-11-02T06:30:00Z"] // 01:30 EDT, then 01:30 EST next day
        );
        // Asked from inside the repeated hour's second pass: the next is tomorrow's.
        assert_eq!(
            e.next_after(utc("2026-11-01T06:10:00Z")),
            Some(utc("2026-11-02T06:30:00Z"))
        );
        assert_eq!(
            e.prev_before(utc("2026-11-02T06:30:00Z")),
            Some(utc("2026-11-01T05:30:00Z"))
        );
    }

    #[test]
    fn hourly_ticks_go_on_through_the_repeated_hour() {
        let e = expr("0,30 * * * *", "America/New_York");
        let expected = [
            "2026-11-01T05:00:00Z", // 01:00 EDT
            "2026-11-01T05:30:00Z", // 01:30 EDT
            "2026-11-01T06:00:00Z", // 01:00 EST
            "2026-11-01T06:30:00Z", // 01:30 EST
            "2026-11-01T07:00:00Z", // 02:00 EST
        ];
        assert_eq!(ticks(&e, "2026-11-01T04:45:00Z", 5), expected);
        // Backwards gives the same ticks in reverse.
        let mut back = Vec::new();
        let mut at = utc("2026-11-01T07:00:01Z");
        for _ in 0..5 {
            at = e.prev_before(at).expect("a tick");
            back.push(at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
        }
        back.reverse();
        assert_eq!(back, expected);
    }

    #[test]
    fn every_second_across_the_repeated_hour_is_strictly_increasing() {
        let e = expr("* * * * * *", "Europe/Berlin");
        // 2026-10-25 03:00 CEST becomes 02:00 CET (01:00 UTC).
        let from = utc("2026-10-25T00:59:58Z");
        let got = e.upcoming(from, 4);
        let want: Vec<_> = (1..=4).map(|s| from + Duration::seconds(s)).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn an_expression_that_never_fires_has_no_next_tick() {
        let e = expr("0 0 30 2 *", "UTC");
        assert_eq!(e.next_after(utc("2026-01-01T00:00:00Z")), None);
        let past = expr("0 0 0 1 1 * 2020", "UTC");
        assert_eq!(past.next_after(utc("2026-01-01T00:00:00Z")), None);
        assert_eq!(
            past.prev_before(utc("2026-01-01T00:00:00Z")),
            Some(utc("2020-01-01T00:00:00Z"))
        );
    }
}
