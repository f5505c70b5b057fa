//! The scheduler loop. Every instance may run one; they share the work through the database:
//!
//! 1. take one enabled schedule whose next tick is due (`FOR UPDATE SKIP LOCKED`: a schedule
//!    another instance is handling is skipped, never waited for);
//! 2. [`plan`](super::plan::plan) which ticks fire under its catch-up policy, and for each
//!    one, unless its overlap policy says skip, start the run with the tick's idempotency key
//!    and record it;
//! 3. move the schedule to its next tick and commit; repeat until nothing is due;
//! 4. sleep until the earliest next tick (at most `max_sleep`), woken early by `NOTIFY` on
//!    [`CHANNEL`] when a schedule changes.
//!
//! A crash between starting a run and committing step 3 leaves the schedule due: the next
//! instance to handle it starts the same tick again, gets the existing run back (same key),
//! and records it. So each tick has exactly one run, whichever instance starts it.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use sqlx::postgres::PgListener;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::plan::{self, CatchUpRules};
use super::store::{self, CHANNEL, ScheduleRow};
use super::{Overlap, ScheduleError, TickOutcome, tick_key};
use crate::engine::{Engine, EngineError, Trigger, TriggerOptions, metrics_names as m};

/// How the scheduler behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// When a tick counts as missed, and how many missed ticks `all` fires at most.
    pub catch_up: CatchUpRules,
    /// The longest sleep without looking at the schedules: a safety net should a notification
    /// be lost or the wall clock jump.
    pub max_sleep: Duration,
    /// How long to wait before trying again after the database failed.
    pub retry_after: Duration,
    /// How long to wait when the earliest due schedule is being handled by another instance
    /// (locked), before looking again.
    pub busy_backoff: Duration,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            catch_up: CatchUpRules::default(),
            max_sleep: Duration::from_secs(60),
            retry_after: Duration::from_secs(1),
            busy_backoff: Duration::from_millis(100),
        }
    }
}

/// A running scheduler. Dropping it does not stop it: call [`SchedulerHandle::shutdown`].
pub struct SchedulerHandle {
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl SchedulerHandle {
    /// Stops the scheduler; a schedule being handled is finished first (its transaction is
    /// short), so nothing is left half done.
    pub async fn shutdown(self) {
        self.stop.cancel();
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

pub(crate) async fn start(engine: Engine, config: SchedulerConfig) -> Result<SchedulerHandle, EngineError> {
    let mut listener = PgListener::connect_with(engine.worker_pool()).await?;
    listener.listen(CHANNEL).await?;
    let wake = Arc::new(Notify::new());
    let stop = CancellationToken::new();
    let tasks = vec![
        tokio::spawn(listen_loop(listener, Arc::clone(&wake), stop.clone())),
        tokio::spawn(run_loop(engine, config, wake, stop.clone())),
    ];
    info!("scheduler started");
    Ok(SchedulerHandle { stop, tasks })
}

/// How long the loop sleeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sleep {
    /// Until the schedules' clock reads this (the next tick, or the safety cap).
    Until(DateTime<Utc>),
    /// For this much real time (the database failed, or another instance holds the due
    /// schedule): retrying is about the database, not about ticks.
    For(Duration),
}

async fn run_loop(engine: Engine, config: SchedulerConfig, wake: Arc<Notify>, stop: CancellationToken) {
    let clock = Arc::clone(engine.clock());
    loop {
        let sleep = match fire_due(&engine, &config, clock.now(), &stop).await {
            Ok(()) => match store::next_due(engine.worker_pool()).await {
                Ok(next) => next_sleep(next, clock.now(), &config),
                Err(e) => {
                    warn!(error = %e, "reading the next tick failed");
                    Sleep::For(config.retry_after)
                }
            },
            Err(e) => {
                warn!(error = %e, "firing due schedules failed; trying again");
                Sleep::For(config.retry_after)
            }
        };
        debug!(?sleep, "scheduler sleeping");
        let sleeping = match sleep {
            Sleep::Until(deadline) => clock.sleep_until(deadline),
            Sleep::For(pause) => Box::pin(tokio::time::sleep(pause)),
        };
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            _ = wake.notified() => {}
            _ = sleeping => {}
        }
    }
}

/// After handling everything due: sleep until the earliest next tick, at most `max_sleep`. A
/// tick already due that we could not take is another instance's: look again shortly.
fn next_sleep(next: Option<DateTime<Utc>>, now: DateTime<Utc>, config: &SchedulerConfig) -> Sleep {
    let cap = now + chrono::Duration::from_std(config.max_sleep).unwrap_or(chrono::Duration::MAX);
    match next {
        Some(next) if next <= now => Sleep::For(config.busy_backoff),
        Some(next) => Sleep::Until(next.min(cap)),
        None => Sleep::Until(cap),
    }
}

async fn listen_loop(mut listener: PgListener, wake: Arc<Notify>, stop: CancellationToken) {
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            received = listener.try_recv() => match received {
                Ok(Some(_)) => wake.notify_one(),
                // Reconnected: a change may have gone unheard, so look again.
                Ok(None) => wake.notify_one(),
                Err(e) => {
                    debug!(error = %e, "listening for schedule changes failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
}

/// Handles every schedule due at `now`, one transaction each.
pub(crate) async fn fire_due(
    engine: &Engine,
    config: &SchedulerConfig,
    now: DateTime<Utc>,
    stop: &CancellationToken,
) -> Result<(), ScheduleError> {
    while !stop.is_cancelled() {
        let mut tx = engine.worker_pool().begin().await?;
        let Some(row) = store::claim_due(&mut tx, now).await? else {
            return Ok(());
        };
        handle(engine, &mut tx, row, now, &config.catch_up).await?;
        tx.commit().await?;
    }
    Ok(())
}

/// Fires what is due of one locked schedule and moves it to its next tick.
async fn handle(
    engine: &Engine,
    tx: &mut PgConnection,
    row: ScheduleRow,
    now: DateTime<Utc>,
    rules: &CatchUpRules,
) -> Result<(), ScheduleError> {
    let Some(due_from) = row.next_fire_at else {
        return Ok(());
    };
    let cron = match row.compile() {
        Ok(cron) => cron,
        Err(e) => {
            // Stored before a change of syntax or of the time-zone database: stop it, say why.
            warn!(schedule = %row.name, error = %e, "the schedule's expression is no longer understood");
            store::advance(tx, &row.name, None, None, Some(&e.to_string())).await?;
            return Ok(());
        }
    };
    let plan = plan::plan(&cron, due_from, now, row.catch_up, rules);
    if let Some((first, last)) = plan.skipped {
        info!(schedule = %row.name, %first, %last, policy = ?row.catch_up, "missed ticks not fired (catch-up policy)");
        metrics::counter!(m::SCHEDULE_TICKS, "workflow" => row.workflow.clone(), "outcome" => "skipped_missed")
            .increment(1);
    }
    let mut last_fire = None;
    let mut last_error = None;
    for tick in plan.fire {
        let outcome = fire_tick(engine, tx, &row, tick).await?;
        metrics::counter!(m::SCHEDULE_TICKS, "workflow" => row.workflow.clone(), "outcome" => outcome.as_str())
            .increment(1);
        match outcome {
            TickOutcome::Started(run) => {
                info!(schedule = %row.name, %tick, run_id = %run, "tick fired");
                last_fire = Some((tick, run));
            }
            TickOutcome::AlreadyStarted(run) => {
                debug!(schedule = %row.name, %tick, run_id = %run, "tick had fired already");
                last_fire = Some((tick, run));
            }
            TickOutcome::SkippedOverlap => {
                info!(schedule = %row.name, %tick, "tick skipped: a run of the schedule is still in flight");
            }
            TickOutcome::Refused(why) => {
                warn!(schedule = %row.name, %tick, error = %why, "tick could not start a run");
                last_error = Some(why);
            }
        }
    }
    store::advance(tx, &row.name, plan.next_fire_at, last_fire, last_error.as_deref()).await?;
    Ok(())
}

/// Starts the run of one tick, unless the overlap policy skips it.
async fn fire_tick(
    engine: &Engine,
    tx: &mut PgConnection,
    row: &ScheduleRow,
    tick: DateTime<Utc>,
) -> Result<TickOutcome, ScheduleError> {
    let in_flight = row.overlap == Overlap::Skip && store::in_flight(tx, &row.name).await?;
    if !row.overlap.allows(in_flight) {
        return Ok(TickOutcome::SkippedOverlap);
    }
    let options = TriggerOptions {
        idempotency_key: Some(tick_key(&row.name, tick)),
        trigger: Some(Trigger::Schedule),
    };
    let outcome = match engine.trigger(&row.workflow, row.input.clone(), options).await {
        Ok(t) if t.created => TickOutcome::Started(t.run_id),
        Ok(t) => TickOutcome::AlreadyStarted(t.run_id),
        // The tick fired before with the input the schedule had then.
        Err(EngineError::IdempotencyConflict { run, .. }) => TickOutcome::AlreadyStarted(run),
        // A run the scheduler did not start holds the tick's key: never adopt it as the
        // tick's run; say so on the schedule (`IdempotencyKeyTaken` lands in `Refused`).
        Err(EngineError::Database(e)) => return Err(e.into()),
        Err(e) => TickOutcome::Refused(e.to_string()),
    };
    if let TickOutcome::Started(run) | TickOutcome::AlreadyStarted(run) = outcome {
        store::record_fire(tx, &row.name, tick, false, run, &engine.config().node_id).await?;
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loop_sleeps_until_the_next_tick_within_its_cap() {
        let config = SchedulerConfig::default();
        let now = Utc::now();
        let soon = now + chrono::Duration::seconds(5);
        assert_eq!(next_sleep(Some(soon), now, &config), Sleep::Until(soon));
        let cap = now + chrono::Duration::seconds(60);
        assert_eq!(
            next_sleep(Some(now + chrono::Duration::hours(3)), now, &config),
            Sleep::Until(cap)
        );
        assert_eq!(next_sleep(None, now, &config), Sleep::Until(cap));
        // Due and not taken by us: another instance has it locked.
        assert_eq!(next_sleep(Some(now), now, &config), Sleep::For(config.busy_backoff));
    }
}
