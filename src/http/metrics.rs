//! `/metrics` in Prometheus text: runs started and finished by status, step attempts, step
//! and run durations as histograms, recoveries, lease takeovers and fenced writes, schedule
//! ticks and runs deleted by the retention sweep. The engine records through the `metrics`
//! facade; this module installs the Prometheus recorder.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use super::throttle;
use crate::engine::metrics_names as m;

/// Buckets of the duration histograms, in seconds.
const DURATION_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Buckets of the small counts (runs per batch, attempts per segment): one per value up to
/// the batch bound of 16, then a few more.
const COUNT_BUCKETS: [f64; 19] = [
    1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0, 16.0, 24.0, 32.0, 64.0,
];

/// The process-wide Prometheus handle, installing the recorder on first use. `None` if the
/// embedding application installed another recorder first.
pub fn handle() -> Option<&'static PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &DURATION_BUCKETS)
                .ok()?
                .set_buckets_for_metric(Matcher::Full(m::BATCH_RUNS.into()), &COUNT_BUCKETS)
                .ok()?
                .set_buckets_for_metric(Matcher::Full(m::SEGMENT_ATTEMPTS.into()), &COUNT_BUCKETS)
                .ok()?
                .set_buckets_for_metric(Matcher::Full(m::COHORT_RUNS.into()), &COUNT_BUCKETS)
                .ok()?;
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("another metrics recorder is installed; /metrics will be empty");
                return None;
            }
            describe();
            Some(handle)
        })
        .as_ref()
}

fn describe() {
    metrics::describe_gauge!(
        m::SLOTS_BUSY,
        "Worker slots in use (a run being driven holds one; a waiting run none)"
    );
    metrics::describe_gauge!(m::CONNECTIONS_BUSY, "Database connections in use, by pool");
    metrics::describe_counter!(m::RUNS_STARTED, "Runs accepted, by workflow and trigger");
    metrics::describe_counter!(
        m::RUNS_FINISHED,
        "Runs that reached a terminal status, by workflow and status"
    );
    metrics::describe_counter!(
        m::STEP_ATTEMPTS,
        "Step and compensation attempts, by workflow, step, phase, outcome"
    );
    metrics::describe_histogram!(
        m::STEP_SECONDS,
        metrics::Unit::Seconds,
        "Duration of step and compensation attempts"
    );
    metrics::describe_histogram!(
        m::SEGMENT_ATTEMPTS,
        "Attempts recorded together by one fused segment's commit"
    );
    metrics::describe_histogram!(m::BATCH_RUNS, "Runs whose segments one batch committed together");
    metrics::describe_histogram!(
        m::COHORT_RUNS,
        "Runs one cohort ran through their steps together, one batch call per step, and committed"
    );
    metrics::describe_counter!(
        m::COHORTS_ABANDONED,
        "Cohorts given up (rolled back; their runs went on alone), by reason"
    );
    metrics::describe_counter!(
        m::RUNS_INSERTED_ALONE,
        "Runs of waiting triggers inserted on their own rather than by their first segment, by workflow and reason"
    );
    metrics::describe_histogram!(
        m::RUN_SECONDS,
        metrics::Unit::Seconds,
        "Duration of runs from acceptance to the end"
    );
    metrics::describe_counter!(
        m::RECOVERIES,
        "Runs made claimable because their owner was gone or its lease expired"
    );
    metrics::describe_counter!(m::LEASE_TAKEOVERS, "Claims that took over another worker's lease");
    metrics::describe_counter!(m::FENCED_WRITES, "Writes refused because the lease had been taken over");
    metrics::describe_counter!(
        m::SCHEDULE_TICKS,
        "Schedule ticks handled, by workflow and outcome (started, already_started, skipped_overlap, skipped_missed, refused)"
    );
    metrics::describe_counter!(
        throttle::AUTH_FAILURES,
        "Failed authentications (wrong bearer tokens, failed dashboard logins), by kind"
    );
    metrics::describe_counter!(
        throttle::AUTH_THROTTLED,
        "Requests refused (429) because their address had too many failed authentications, by kind"
    );
    metrics::describe_counter!(m::RUNS_DELETED, "Finished runs deleted by the retention sweep");
    metrics::describe_counter!(
        m::RUNS_PARKED,
        "Runs set aside because their recorded steps do not match their plan (they need an operator)"
    );
    // Counters of rare events are exported from the start, at zero, so alerts can rely on them.
    for name in [m::RECOVERIES, m::LEASE_TAKEOVERS, m::FENCED_WRITES, m::RUNS_PARKED] {
        metrics::counter!(name).increment(0);
    }
    for name in [throttle::AUTH_FAILURES, throttle::AUTH_THROTTLED] {
        for kind in ["bearer", "login"] {
            metrics::counter!(name, "kind" => kind).increment(0);
        }
    }
}

/// The current metrics in Prometheus text format.
pub fn render() -> String {
    match handle() {
        Some(handle) => {
            handle.run_upkeep();
            handle.render()
        }
        None => String::new(),
    }
}
