//! What the benchmark measures with: latency percentiles, and a process's CPU time and peak
//! memory read from /proc.

use std::time::Duration;

use serde::Serialize;

/// Latency percentiles, in milliseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Worst.
    pub max: f64,
}

impl Latency {
    /// Percentiles of the samples (sorted in place).
    pub fn of(samples: &mut [Duration]) -> Self {
        samples.sort();
        let at = |q: f64| -> f64 {
            if samples.is_empty() {
                return f64::NAN;
            }
            let i = ((samples.len() - 1) as f64 * q).round() as usize;
            samples[i].as_secs_f64() * 1000.0
        };
        Self {
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
            max: at(1.0),
        }
    }
}

/// The fields of `/proc/<pid>/stat` after the command name (which may contain spaces, so
/// they start after the last ')'): `[0]` is the state, `[1]` the parent's pid, `[11]`/`[12]`
/// user and system time, `[13]`/`[14]` those of the children waited for.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    Some(rest.split_whitespace().map(str::to_string).collect())
}

fn ticks_per_second() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64
}

/// The sum of the clock-tick fields `which` of a process.
fn ticks(fields: &[String], which: &[usize]) -> Option<f64> {
    which
        .iter()
        .map(|&i| fields.get(i)?.parse::<f64>().ok())
        .sum::<Option<f64>>()
}

/// CPU seconds (user + system) a process has used so far, from /proc.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    Some(ticks(&stat_fields(pid)?, &[11, 12])? / ticks_per_second())
}

/// CPU seconds a PostgreSQL cluster has used so far, from /proc: its postmaster's, that of the
/// backends that exited (the postmaster waited for them), and that of every live child
/// (backends, WAL writer, checkpointer, autovacuum). `backend` is any backend's pid
/// (`pg_backend_pid()`); `None` when it is not a local PostgreSQL process, e.g. a
/// `DATABASE_URL` on another host.
pub fn cluster_cpu_seconds(backend: u32) -> Option<f64> {
    let is_postgres =
        |pid: u32| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|comm| comm.starts_with("postgres"));
    if !is_postgres(backend) {
        return None;
    }
    let postmaster: u32 = stat_fields(backend)?.get(1)?.parse().ok()?;
    if !is_postgres(postmaster) {
        return None;
    }
    let mut total = ticks(&stat_fields(postmaster)?, &[11, 12, 13, 14])?;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        // A child may exit between the listing and the read: its time is then the
        // postmaster's, counted at the next reading.
        if let Some(fields) = stat_fields(pid)
            && fields.get(1).and_then(|p| p.parse::<u32>().ok()) == Some(postmaster)
        {
            total += ticks(&fields, &[11, 12, 13, 14]).unwrap_or(0.0);
        }
    }
    Some(total / ticks_per_second())
}

/// The peak resident set of a process, in MiB, from /proc.
pub fn peak_rss_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_known_samples() {
        let mut samples: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let l = Latency::of(&mut samples);
        assert_eq!(
            (l.p50.round(), l.p90.round(), l.p99.round(), l.max.round()),
            (51.0, 90.0, 99.0, 100.0)
        );
    }

    #[test]
    fn this_process_has_cpu_time_and_a_resident_set() {
        let pid = std::process::id();
        assert!(cpu_seconds(pid).is_some_and(|s| s >= 0.0));
        assert!(peak_rss_mb(pid).is_some_and(|m| m > 0.0));
    }

    #[test]
    fn a_process_that_is_not_postgres_has_no_cluster_time() {
        // This process (a test binary, not PostgreSQL), and a pid no process has: the bench
        // then reports no PostgreSQL CPU rather than another process's.
        assert_eq!(cluster_cpu_seconds(std::process::id()), None);
        assert_eq!(cluster_cpu_seconds(u32::MAX), None);
    }
}
