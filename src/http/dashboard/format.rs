//! How the dashboard writes times, durations, ids and JSON for people, within size limits
//! (no page may grow past 200 KB however large a run's data is).

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

/// Each status is counted up to this many runs (an index scan that stops there), on the runs
/// list and the overview alike; a count that reached it is shown as "10,000+".
pub const COUNT_CAP: i64 = 10_000;

/// A duration in the largest sensible unit: `850 ms`, `1.25 s`, `3 min 04 s`, `2 h 05 min`.
pub fn duration_ms(ms: i64) -> String {
    let ms = ms.max(0);
    if ms < 1_000 {
        format!("{ms} ms")
    } else if ms < 60_000 {
        let text = format!("{:.2}", ms as f64 / 1000.0);
        format!("{} s", text.trim_end_matches('0').trim_end_matches('.'))
    } else if ms < 3_600_000 {
        format!("{} min {:02} s", ms / 60_000, (ms / 1000) % 60)
    } else {
        format!("{} h {:02} min", ms / 3_600_000, (ms / 60_000) % 60)
    }
}

/// The time between two instants, as [`duration_ms`].
pub fn between(from: DateTime<Utc>, to: DateTime<Utc>) -> String {
    duration_ms((to - from).num_milliseconds())
}

/// An instant, to the second, in UTC (operators of several time zones read the same text).
pub fn time(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

/// An instant for a `<time datetime>` attribute.
pub fn machine_time(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The end of a run id: enough to tell runs apart on a page. (Run ids are UUIDv7, whose
/// first characters are a timestamp shared by runs started together; the end is random.)
pub fn short_id(id: Uuid) -> String {
    let hex = id.simple().to_string();
    format!("…{}", &hex[hex.len() - 8..])
}

/// Text cut to `max` characters, with an ellipsis when cut.
pub fn clip(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_string()
    } else {
        let mut cut: String = text.chars().take(max.saturating_sub(1)).collect();
        cut.push('…');
        cut
    }
}

/// JSON written for reading, cut to a size budget.
#[derive(Debug, Clone, PartialEq)]
pub struct JsonText {
    /// Indented JSON, possibly cut.
    pub text: String,
    /// Whether it was cut.
    pub truncated: bool,
    /// The budget it was cut to, for people.
    pub limit: String,
}

/// Collects up to `limit` bytes, then refuses more (which stops the serializer: a huge value
/// costs no more than its first `limit` bytes).
struct Capped {
    bytes: Vec<u8>,
    limit: usize,
    full: bool,
}

impl std::io::Write for Capped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let room = self.limit - self.bytes.len();
        if buf.len() > room {
            self.bytes.extend_from_slice(&buf[..room]);
            self.full = true;
            return Err(std::io::Error::other("budget reached"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `value` indented, cut to `max_bytes` (on a character boundary) when larger.
pub fn json(value: &Value, max_bytes: usize) -> JsonText {
    let mut out = Capped {
        bytes: Vec::with_capacity(max_bytes.min(4096)),
        limit: max_bytes,
        full: false,
    };
    let _ = serde_json::to_writer_pretty(&mut out, value);
    let mut text = String::from_utf8_lossy(&out.bytes).into_owned();
    if out.full {
        // A cut through a multi-byte character leaves a replacement character at the end.
        while text.ends_with('\u{fffd}') {
            text.pop();
        }
    }
    JsonText {
        text,
        truncated: out.full,
        limit: bytes(max_bytes),
    }
}

/// A size for people: `812 B`, `4.2 KB`, `1.3 MB`.
pub fn bytes(n: usize) -> String {
    if n < 1024 {
        format!("{n} B")
    } else if n < 1024 * 1024 {
        format!("{:.1} KB", n as f64 / 1024.0)
    } else {
        format!("{:.1} MB", n as f64 / (1024.0 * 1024.0))
    }
}

/// A count with thousands separators, and `+` when it reached the cap it was counted to.
pub fn count(n: i64, cap: Option<i64>) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3 + 1);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) && c.is_ascii_digit() {
            out.push(',');
        }
        out.push(c);
    }
    if cap.is_some_and(|cap| n >= cap) {
        out.push('+');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn durations_read_naturally() {
        assert_eq!(duration_ms(0), "0 ms");
        assert_eq!(duration_ms(850), "850 ms");
        assert_eq!(duration_ms(1_000), "1 s");
        assert_eq!(duration_ms(1_250), "1.25 s");
        assert_eq!(duration_ms(184_000), "3 min 04 s");
        assert_eq!(duration_ms(7_500_000), "2 h 05 min");
        assert_eq!(duration_ms(-5), "0 ms");
    }

    #[test]
    fn json_is_cut_on_a_character_boundary() {
        let value = json!({"name": "é".repeat(100)});
        let full = json(&value, 10_000);
        assert!(!full.truncated);
        assert!(full.text.contains("\"name\""));
        let exact = json(&value, full.text.len());
        assert!(!exact.truncated, "a value exactly at the budget is whole");
        let cut = json(&value, 20);
        assert!(cut.truncated);
        assert!(cut.text.len() <= 20);
        assert!(cut.text.starts_with("{\n  \"name\": \"é"), "{}", cut.text);
        assert_eq!(cut.limit, "20 B");
    }

    #[test]
    fn counts_and_clips() {
        assert_eq!(count(0, None), "0");
        assert_eq!(count(1_234_567, None), "1,234,567");
        assert_eq!(count(10_000, Some(10_000)), "10,000+");
        assert_eq!(count(9_999, Some(10_000)), "9,999");
        assert_eq!(clip("abcdef", 4), "abc…");
        assert_eq!(clip("abc", 4), "abc");
        let id = Uuid::parse_str("01a21b97-7ac0-7280-a4c3-087742799a7b").expect("uuid");
        assert_eq!(short_id(id), "…42799a7b");
    }
}
