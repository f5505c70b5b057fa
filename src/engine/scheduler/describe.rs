//! A cron expression in words, for people: "every 15 minutes", "at 09:30 on Monday to
//! Friday (Europe/Paris)". Built from the parsed fields, so it says what the schedule does
//! rather than paraphrasing the text (and shows how crontab's day fields were read).

use cron::{Schedule, TimeUnitSpec};

use super::expr::{CronExpr, Form};

const WEEKDAYS: [&str; 7] = [
    "Sunday",
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
];
const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// The expression in words, with its time zone.
pub fn describe(expr: &CronExpr) -> String {
    let Some(first) = expr.schedules().first() else {
        return expr.source().to_string();
    };
    let time = time_phrase(first);
    let days = day_phrase(expr);
    let mut text = time.clone();
    if days.is_empty() && time.starts_with("at ") && first.months().is_all() && first.years().is_all() {
        text.push_str(" every day");
    }
    text.push_str(&days);
    if !first.months().is_all() {
        text.push_str(&format!(" in {}", list(&values(first.months()), month_name)));
    }
    if !first.years().is_all() {
        text.push_str(&format!(" in {}", list(&values(first.years()), |y| y.to_string())));
    }
    format!("{text} ({})", expr.time_zone().name())
}

fn values(spec: &impl TimeUnitSpec) -> Vec<u32> {
    spec.iter().collect()
}

fn time_phrase(s: &Schedule) -> String {
    let (secs, mins, hours) = (values(s.seconds()), values(s.minutes()), values(s.hours()));
    let at_zero = |v: &[u32]| v == [0];
    let second_suffix = if at_zero(&secs) {
        String::new()
    } else {
        format!(", second {}", list(&secs, |v| v.to_string()))
    };
    if s.hours().is_all() || s.minutes().is_all() {
        let within_hour = if s.minutes().is_all() {
            if s.seconds().is_all() {
                "every second".to_string()
            } else if let Some(k) = step(&secs, 60) {
                format!("every {k} seconds")
            } else if at_zero(&secs) {
                "every minute".to_string()
            } else {
                format!("every minute at second {}", list(&secs, |v| v.to_string()))
            }
        } else if s.seconds().is_all() {
            format!("every second of minute {}", list(&mins, |v| v.to_string()))
        } else if at_zero(&secs) && at_zero(&mins) {
            "every hour".to_string()
        } else if let (true, Some(k)) = (at_zero(&secs), step(&mins, 60)) {
            format!("every {k} minutes")
        } else {
            format!("every hour at minute {}{second_suffix}", list(&mins, |v| v.to_string()))
        };
        return if s.hours().is_all() {
            within_hour
        } else {
            format!("{within_hour} during hour {}", list(&hours, |v| v.to_string()))
        };
    }
    if let (true, true, Some(k)) = (at_zero(&secs), at_zero(&mins), step(&hours, 24)) {
        return format!("every {k} hours");
    }
    if hours.len() * mins.len() * secs.len() <= 8 {
        let mut times = Vec::new();
        for h in &hours {
            for m in &mins {
                for sec in &secs {
                    times.push(if at_zero(&secs) {
                        format!("{h:02}:{m:02}")
                    } else {
                        format!("{h:02}:{m:02}:{sec:02}")
                    });
                }
            }
        }
        return format!("at {}", join(&times));
    }
    format!(
        "at minute {}{second_suffix} past hour {}",
        list(&mins, |v| v.to_string()),
        list(&hours, |v| v.to_string())
    )
}

fn day_phrase(expr: &CronExpr) -> String {
    let schedules = expr.schedules();
    let weekday_names = |s: &Schedule| list(&values(s.days_of_week()), weekday_name);
    let month_days = |s: &Schedule| list(&values(s.days_of_month()), |d| d.to_string());
    match schedules {
        // Crontab with both day fields restricted: either day fires.
        [by_date, by_weekday] => format!(
            " on day {} of the month or on {}",
            month_days(by_date),
            weekday_names(by_weekday)
        ),
        [s] => match (s.days_of_month().is_all(), s.days_of_week().is_all()) {
            (true, true) => String::new(),
            (false, true) => format!(" on day {} of the month", month_days(s)),
            (true, false) => format!(" on {}", weekday_names(s)),
            (false, false) => {
                let joiner = if expr.form() == Form::Crontab {
                    "or on"
                } else {
                    "when it is a"
                };
                format!(" on day {} of the month {joiner} {}", month_days(s), weekday_names(s))
            }
        },
        _ => String::new(),
    }
}

fn weekday_name(ordinal: u32) -> String {
    // The `cron` crate numbers days of the week from 1 (Sunday).
    WEEKDAYS
        .get(ordinal.wrapping_sub(1) as usize)
        .map_or_else(|| ordinal.to_string(), |n| n.to_string())
}

fn month_name(ordinal: u32) -> String {
    MONTHS
        .get(ordinal.wrapping_sub(1) as usize)
        .map_or_else(|| ordinal.to_string(), |n| n.to_string())
}

/// `k` when `values` is 0, k, 2k, ... covering a cycle of `modulus` evenly (so "every k" is
/// true across the wrap too).
fn step(values: &[u32], modulus: u32) -> Option<u32> {
    let k = *values.get(1)?;
    let evenly = values.first() == Some(&0)
        && k > 1
        && modulus.is_multiple_of(k)
        && values.len() as u32 == modulus / k
        && values.iter().enumerate().all(|(i, v)| *v == i as u32 * k);
    evenly.then_some(k)
}

/// Values as words, runs of three or more as ranges: "1 to 5, 7 and 9".
fn list(values: &[u32], name: impl Fn(u32) -> String) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < values.len() {
        let mut j = i;
        while j + 1 < values.len() && values[j + 1] == values[j] + 1 {
            j += 1;
        }
        if j >= i + 2 {
            parts.push(format!("{} to {}", name(values[i]), name(values[j])));
        } else {
            parts.extend(values[i..=j].iter().map(|v| name(*v)));
        }
        i = j + 1;
    }
    join(&parts)
}

fn join(parts: &[String]) -> String {
    match parts {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::scheduler::expr::parse_time_zone;

    fn words(text: &str, zone: &str) -> String {
        let tz = parse_time_zone(zone).expect("zone");
        describe(&CronExpr::parse(text, tz).expect("expression"))
    }

    #[test]
    fn common_expressions_read_naturally() {
        let cases = [
            ("* * * * * *", "every second (UTC)"),
            ("*/5 * * * * *", "every 5 seconds (UTC)"),
            ("* * * * *", "every minute (UTC)"),
            ("*/15 * * * *", "every 15 minutes (UTC)"),
            ("0 * * * *", "every hour (UTC)"),
            ("@hourly", "every hour (UTC)"),
            ("30 * * * *", "every hour at minute 30 (UTC)"),
            ("0 */6 * * *", "every 6 hours (UTC)"),
            ("0 3 * * *", "at 03:00 every day (UTC)"),
            ("0 9,17 * * *", "at 09:00 and 17:00 every day (UTC)"),
            ("30 9 * * 1-5", "at 09:30 on Monday to Friday (UTC)"),
            ("*/10 * * * sat,sun", "every 10 minutes on Sunday and Saturday (UTC)"),
            ("0 0 1 * *", "at 00:00 on day 1 of the month (UTC)"),
            (
                "0 0 1 1,7 *",
                "at 00:00 on day 1 of the month in January and July (UTC)",
            ),
            ("0 0 13 * 5", "at 00:00 on day 13 of the month or on Friday (UTC)"),
            (
                "0 0 0 13 * FRI",
                "at 00:00 on day 13 of the month when it is a Friday (UTC)",
            ),
            ("* 9-17 * * *", "every minute during hour 9 to 17 (UTC)"),
            ("15 10 * * * *", "every hour at minute 10, second 15 (UTC)"),
            (
                "0 0 12 1 1 * 2030",
                "at 12:00 on day 1 of the month in January in 2030 (UTC)",
            ),
            ("0 0 3 * * *", "at 03:00 every day (UTC)"),
        ];
        for (expression, expected) in cases {
            assert_eq!(words(expression, "UTC"), expected, "{expression}");
        }
        assert_eq!(words("0 3 * * *", "Europe/Paris"), "at 03:00 every day (Europe/Paris)");
    }

    #[test]
    fn uneven_steps_are_listed_not_called_every() {
        // */7 minutes fires at 56 then 0: not "every 7 minutes".
        assert_eq!(
            words("*/7 * * * *", "UTC"),
            "every hour at minute 0, 7, 14, 21, 28, 35, 42, 49 and 56 (UTC)"
        );
        assert_eq!(step(&[0, 7, 14], 60), None);
        assert_eq!(step(&[0, 20, 40], 60), Some(20));
        assert_eq!(list(&[1, 2, 3, 5, 6, 9], |v| v.to_string()), "1 to 3, 5, 6 and 9");
    }
}
