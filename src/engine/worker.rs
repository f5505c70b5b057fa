//! A worker: the part of an engine instance that claims runs and drives them.
//!
//! Its loops:
//! - the **dispatcher** claims due runs in batches, woken by LISTEN/NOTIFY (the database
//!   announces runs that become due), by finished runs when work was waiting, and by a
//!   fallback timer that sleeps until the next known due time (retry timers) or the poll
//!   interval;
//! - the **heartbeat** renews the leases of the runs it holds and checks the session that
//!   holds its liveness lock (reconnecting and re-locking after a database restart);
//! - **recovery** makes claimable the runs of workers that are gone (their liveness lock is
//!   free: immediate) or whose lease expired.
//!
//! Shutdown stops claiming, lets attempts in flight finish (bounded by the grace period),
//! gives every lease back and releases the liveness lock.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::Value;
use sqlx::postgres::PgListener;
use sqlx::{ConnectOptions, Connection, PgConnection};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use super::apply::{self, Applied, ApplyError, Change};
use super::definition::Workflow;
use super::executor::{Cohorts, Gathering, Lease, RunTask, Slot};
use super::lane::Lanes;
use super::machine::{Conditions, Event, Machine, Transition};
use super::state::RunState;
use super::store::{self, READY_CHANNEL};
use super::{Engine, EngineError, RunDetail, metrics_names as m};

/// State shared by a worker's loops and the runs it drives.
pub(crate) struct WorkerShared {
    /// This incarnation's id (the `workers` row and the liveness lock's key).
    pub(crate) id: i32,
    /// How log entries name this worker.
    pub(crate) name: String,
    /// One permit per run driven at once.
    pub(crate) permits: Arc<Semaphore>,
    /// Set at shutdown: runs are handed back instead of starting new attempts.
    draining: AtomicBool,
    /// Wakes the dispatcher.
    wake: Notify,
    /// The dispatcher left due work unclaimed for lack of permits.
    starved: AtomicBool,
    /// The executors, so shutdown can wait for them.
    tasks: TaskTracker,
    /// Cancelled when the grace period ends: executors still running are dropped.
    abort: CancellationToken,
    /// The runs an executor of this worker is driving, with their lease epochs. Only these
    /// leases are renewed: a lease whose executor is gone (a claim or trigger whose commit
    /// succeeded but whose acknowledgement was lost) must expire so the run is recovered.
    active: std::sync::Mutex<std::collections::HashMap<uuid::Uuid, i64>>,
    /// Where executors commit their fused segments together (none: each on its own).
    lanes: Option<Lanes>,
    /// Where waiting triggers' runs go through their steps together (none: no cohorts).
    cohorts: Option<Cohorts>,
}

impl Slot for WorkerShared {
    fn worker_id(&self) -> i32 {
        self.id
    }

    fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// If work was waiting for a permit, claim it.
    fn run_done(&self) {
        if self.starved.swap(false, Ordering::Relaxed) {
            self.wake.notify_one();
        }
    }

    fn lanes(&self) -> Option<&Lanes> {
        self.lanes.as_ref()
    }

    fn cohorts(&self) -> Option<&Cohorts> {
        self.cohorts.as_ref()
    }
}

impl WorkerShared {
    fn active(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<uuid::Uuid, i64>> {
        self.active.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The leases to renew: the runs being driven, with their epochs.
    fn active_leases(&self) -> (Vec<uuid::Uuid>, Vec<i64>) {
        self.active().iter().map(|(run, epoch)| (*run, *epoch)).unzip()
    }

    /// A free slot of this worker, if it has one and is not shutting down: a run leased to
    /// it in its insert's transaction needs no claim round trip.
    pub(crate) fn free_slot(self: &Arc<Self>) -> Option<OwnedSemaphorePermit> {
        if self.is_draining() {
            return None;
        }
        Arc::clone(&self.permits).try_acquire_owned().ok()
    }

    /// The machine's decision when this worker leases a run (at a claim, or at the insert of
    /// a run it starts itself): the first transition under the new lease.
    pub(crate) fn claim(
        &self,
        workflow: &Workflow,
        input: &Value,
        state: &mut RunState,
        taken_over_from: Option<String>,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Transition {
        let conditions = Conditions {
            draining: false,
            jitter: rand::random::<f64>(),
            now,
        };
        Machine::new(workflow, input).handle(
            state,
            Event::Claimed {
                by: self.name.clone(),
                taken_over_from,
            },
            &conditions,
        )
    }

    /// Starts driving a run whose lease (and first transition) committed, in `slot`.
    pub(crate) fn start(
        self: &Arc<Self>,
        engine: &Engine,
        workflow: Arc<Workflow>,
        lease: Lease,
        slot: OwnedSemaphorePermit,
    ) {
        let worker: Arc<dyn Slot> = Arc::clone(self) as Arc<dyn Slot>;
        self.spawn(RunTask::new(engine.clone(), worker, workflow, lease, slot));
    }

    /// How many runs an executor of this worker is driving now (a waiting run is not one).
    pub(crate) fn driving(&self) -> usize {
        self.active().len()
    }

    fn spawn(self: &Arc<Self>, task: RunTask) {
        let abort = self.abort.clone();
        let (run, epoch) = (task.run_id, task.epoch);
        self.active().insert(run, epoch);
        let shared = Arc::clone(self);
        self.tasks.spawn(async move {
            tokio::select! {
                _ = abort.cancelled() => {}
                _ = task.drive() => {}
            }
            let mut active = shared.active();
            if active.get(&run) == Some(&epoch) {
                active.remove(&run);
            }
        });
    }
}

/// A running worker. Dropping it does not stop it: call [`WorkerHandle::shutdown`].
pub struct WorkerHandle {
    engine: Engine,
    shared: Arc<WorkerShared>,
    stop_claiming: CancellationToken,
    stop_upkeep: CancellationToken,
    loops: Vec<JoinHandle<()>>,
    upkeep: Vec<JoinHandle<()>>,
}

impl WorkerHandle {
    /// This worker's id (its `workers` row).
    pub fn id(&self) -> i32 {
        self.shared.id
    }

    /// Stops the worker the way a crash would, for tests of recovery: attempts in flight are
    /// dropped mid-way, no lease is given back, nothing is recorded, and the session holding
    /// the liveness lock is closed.
    pub async fn abandon(self) {
        self.engine.inner.detach_worker();
        self.stop_claiming.cancel();
        for handle in self.loops {
            let _ = handle.await;
        }
        self.shared.abort.cancel();
        self.shared.tasks.close();
        self.shared.tasks.wait().await;
        self.stop_upkeep.cancel();
        for handle in self.upkeep {
            let _ = handle.await;
        }
    }

    /// Stops claiming, lets attempts in flight finish (up to the engine's grace period),
    /// gives every lease back and releases the liveness lock.
    pub async fn shutdown(self) {
        let grace = self.engine.inner.config.shutdown_grace;
        info!(worker = %self.shared.name, "worker shutting down");
        self.shared.draining.store(true, Ordering::Relaxed);
        self.stop_claiming.cancel();
        for handle in self.loops {
            let _ = handle.await;
        }
        self.shared.tasks.close();
        if tokio::time::timeout(grace, self.shared.tasks.wait()).await.is_err() {
            warn!(?grace, "attempts still running after the grace period; abandoning them");
            self.shared.abort.cancel();
            self.shared.tasks.wait().await;
        }
        let pool = &self.engine.inner.worker_pool;
        match store::release_all(
            pool,
            self.shared.id,
            "the worker shut down before the attempt finished",
            self.engine.now(),
        )
        .await
        {
            Ok(0) => {}
            Ok(n) => info!(runs = n, "leases given back"),
            Err(e) => error!(error = %e, "could not give leases back; they will expire"),
        }
        if let Err(e) = store::stop_worker(pool, self.shared.id).await {
            warn!(error = %e, "could not record the worker's stop");
        }
        self.stop_upkeep.cancel();
        for handle in self.upkeep {
            let _ = handle.await;
        }
        self.engine.inner.detach_worker();
        info!(worker = %self.shared.name, "worker stopped");
    }
}

/// Registers a worker, takes its liveness lock, recovers what is recoverable at once, and
/// starts its loops.
pub(crate) async fn start(engine: Engine) -> Result<WorkerHandle, EngineError> {
    let inner = &engine.inner;
    let config = &inner.config;
    let id = store::register_worker(&inner.worker_pool, &config.node_id).await?;
    let name = store::describe_worker(&config.node_id, id);
    let mut lock = connect_locked(&engine, id).await?;
    let shared = Arc::new(WorkerShared {
        id,
        name: name.clone(),
        permits: Arc::new(Semaphore::new(config.max_concurrent_runs)),
        draining: AtomicBool::new(false),
        wake: Notify::new(),
        starved: AtomicBool::new(false),
        tasks: TaskTracker::new(),
        abort: CancellationToken::new(),
        active: Default::default(),
        lanes: (config.fuse_local_steps && config.commit_lanes > 0 && config.batch_max_runs > 1)
            .then(|| Lanes::start(&inner.worker_pool, config.commit_lanes, config.batch_max_runs)),
        cohorts: cohort_runners(config, inner.worker_pool.options().get_max_connections()).map(|runners| {
            Cohorts::start(
                &inner.worker_pool,
                runners,
                Gathering {
                    max_runs: config.cohort_max_runs,
                    wait: config.cohort_gather,
                },
            )
        }),
    });
    // Runs of this node's previous incarnation (and of any worker already gone) need no wait.
    recover(&engine, id).await;

    let mut listener = PgListener::connect_with(&inner.worker_pool).await?;
    listener.listen(READY_CHANNEL).await?;

    let stop_claiming = CancellationToken::new();
    let stop_upkeep = CancellationToken::new();
    let loops = vec![
        tokio::spawn(dispatch_loop(
            engine.clone(),
            Arc::clone(&shared),
            stop_claiming.clone(),
        )),
        tokio::spawn(listen_loop(listener, Arc::clone(&shared), stop_claiming.clone())),
    ];
    let upkeep = vec![
        tokio::spawn({
            let engine = engine.clone();
            let stop = stop_upkeep.clone();
            let shared = Arc::clone(&shared);
            async move {
                heartbeat_loop(&engine, &shared, &mut lock, stop).await;
                let _ = lock.close().await;
            }
        }),
        tokio::spawn(recovery_loop(engine.clone(), id, stop_upkeep.clone())),
        tokio::spawn({
            let engine = engine.clone();
            let stop = stop_upkeep.clone();
            async move {
                engine
                    .inner
                    .changes
                    .publish(engine.inner.worker_pool.clone(), stop)
                    .await
            }
        }),
    ];
    inner.attach_worker(Arc::clone(&shared));
    shared.wake.notify_one();
    info!(worker = %name, max_concurrent_runs = config.max_concurrent_runs, "worker started");
    Ok(WorkerHandle {
        engine,
        shared,
        stop_claiming,
        stop_upkeep,
        loops,
        upkeep,
    })
}

/// A dedicated session holding the worker's liveness lock.
async fn connect_locked(engine: &Engine, id: i32) -> Result<PgConnection, EngineError> {
    let options = engine.inner.worker_pool.connect_options();
    let mut conn = options.connect().await?;
    if !store::lock_worker(&mut conn, id).await? {
        return Err(EngineError::Internal(format!(
            "the liveness lock of worker {id} is held by another session"
        )));
    }
    Ok(conn)
}

async fn recover(engine: &Engine, me: i32) {
    match store::expire_lost_leases(&engine.inner.worker_pool, me, engine.now()).await {
        Ok(expired) if !expired.is_empty() => {
            info!(runs = expired.len(), "runs of lost owners made claimable");
            for run in &expired {
                debug!(run_id = %run.id, previous_owner = ?run.lease_owner, "run made claimable");
            }
            metrics::counter!(m::RECOVERIES).increment(expired.len() as u64);
        }
        Ok(_) => {}
        Err(e) => debug!(error = %e, "recovery check failed"),
    }
}

async fn dispatch_loop(engine: Engine, shared: Arc<WorkerShared>, stop: CancellationToken) {
    let config = &engine.inner.config;
    let mut wake = Wake::after(Duration::ZERO);
    loop {
        let due: futures::future::BoxFuture<'static, ()> = match wake.due {
            Some(due) => engine.inner.clock.sleep_until(due),
            None => Box::pin(std::future::pending()),
        };
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            _ = shared.wake.notified() => {}
            _ = tokio::time::sleep(wake.after) => {}
            _ = due => {}
        }
        let mut claimed_any = false;
        let mut failed = false;
        loop {
            let free = shared.permits.available_permits().min(config.claim_batch);
            if free == 0 {
                shared.starved.store(true, Ordering::Relaxed);
                break;
            }
            match claim_batch(&engine, &shared, free).await {
                Ok(n) => {
                    claimed_any |= n > 0;
                    if n < free {
                        break;
                    }
                }
                Err(e) => {
                    warn!(error = %e, "claiming runs failed");
                    failed = true;
                    break;
                }
            }
        }
        wake = if failed {
            Wake::after(Duration::from_secs(1))
        } else {
            next_wake(&engine, claimed_any).await
        };
    }
}

/// When the dispatcher looks for work again (NOTIFY wakes it earlier).
struct Wake {
    /// At the latest after this long (the poll interval, or a short floor).
    after: Duration,
    /// At this due time on the engine clock (a retry timer), if one is known.
    due: Option<chrono::DateTime<chrono::Utc>>,
}

impl Wake {
    fn after(after: Duration) -> Self {
        Self { after, due: None }
    }
}

/// How long the dispatcher may sleep: until the next known due time (a retry timer) on the
/// engine clock, at most the poll interval.
async fn next_wake(engine: &Engine, claimed_any: bool) -> Wake {
    let poll = engine.inner.config.poll_interval;
    match store::next_due(&engine.inner.worker_pool).await {
        Ok(Some(due)) => {
            // Due runs we did not get are locked by another worker's claim right now: look
            // again shortly rather than spin.
            let floor = if claimed_any {
                Duration::from_millis(5)
            } else {
                Duration::from_millis(100)
            };
            let until = (due - engine.now()).to_std().unwrap_or(Duration::ZERO);
            if until <= floor {
                Wake::after(floor)
            } else {
                Wake {
                    after: poll.max(floor),
                    due: Some(due),
                }
            }
        }
        Ok(None) => Wake::after(poll),
        Err(_) => Wake::after(Duration::from_secs(1)),
    }
}

async fn claim_batch(engine: &Engine, shared: &Arc<WorkerShared>, free: usize) -> Result<usize, EngineError> {
    let inner = &engine.inner;
    let Ok(permits) = Arc::clone(&shared.permits).try_acquire_many_owned(free as u32) else {
        return Ok(0);
    };
    let mut permits = Some(permits);
    let mut tx = inner.worker_pool.begin().await?;
    let claimed = store::claim(
        &mut tx,
        shared.id,
        free as i64,
        engine.lease_ms(),
        &inner.kinds(),
        engine.now(),
    )
    .await?;
    let mut leased = Vec::with_capacity(claimed.len());
    let mut after_commit = Vec::with_capacity(claimed.len());
    let mut parked = Vec::new();
    for c in claimed {
        let Some(workflow) = inner.workflow(&c.run.workflow, c.run.workflow_version) else {
            continue;
        };
        let old = store::run_state(&c.run, &c.steps);
        let recorded: Vec<&str> = c.steps.iter().map(|s| s.name.as_str()).collect();
        let planned: Vec<&str> = workflow.steps.iter().map(|s| s.name.as_str()).collect();
        if recorded != planned {
            // Claimed and dropped, it would be claimed again every lease period, forever: set
            // it aside where operators see it instead.
            let reason = format!(
                "its recorded steps {recorded:?} do not match the steps {planned:?} of {}@{} on node {}",
                workflow.name, workflow.version, engine.inner.config.node_id
            );
            error!(run_id = %c.run.id, %reason, "run parked");
            if store::park_run(&mut tx, c.run.id, c.run.lease_epoch, &reason).await? {
                metrics::counter!(m::RUNS_PARKED, "workflow" => workflow.name.clone()).increment(1);
                parked.push(c.run.id);
            }
            continue;
        }
        let taken_over_from = match c.previous_owner {
            Some(owner) => Some(store::worker_name(&mut tx, owner).await?),
            None => None,
        };
        if taken_over_from.is_some() {
            metrics::counter!(m::LEASE_TAKEOVERS).increment(1);
        }
        let mut state = old.clone();
        let transition = shared.claim(&workflow, &c.run.input, &mut state, taken_over_from, engine.now());
        // A run the claim itself finishes runs its workflow's finish hook here, in a savepoint:
        // should the hook refuse, the run ends `failed` without it, and the rest of the batch
        // is not touched.
        let mut copy = RunDetail {
            run: c.run.clone(),
            steps: c.steps,
        };
        let (applied, transition) = if apply::needs_transaction(&workflow, &transition) {
            let mut savepoint = sqlx::Acquire::begin(&mut *tx).await?;
            let first = apply::apply(
                &mut savepoint,
                Change::of_row(&c.run, &workflow, &old, &state, &transition),
                Some(&mut copy),
            )
            .await;
            match first {
                Ok(applied) => {
                    savepoint.commit().await?;
                    (applied, transition)
                }
                Err(ApplyError::Database(e)) => return Err(e.into()),
                Err(ApplyError::FinishHook(refusal)) => {
                    savepoint.rollback().await?;
                    warn!(run_id = %c.run.id, error = %refusal.message, "the finish hook refused a claimed run's end; it ends failed");
                    let refused = Machine::new(&workflow, &c.run.input).refuse_finish(&mut state, transition, &refusal);
                    let applied = apply::apply(
                        &mut tx,
                        Change {
                            finish_hook: false,
                            ..Change::of_row(&c.run, &workflow, &old, &state, &refused)
                        },
                        Some(&mut copy),
                    )
                    .await
                    .map_err(|e| EngineError::Internal(e.to_string()))?;
                    (applied, refused)
                }
            }
        } else {
            let applied = apply::apply(
                &mut tx,
                Change::of_row(&c.run, &workflow, &old, &state, &transition),
                Some(&mut copy),
            )
            .await
            .map_err(|e| match e {
                ApplyError::Database(e) => EngineError::Database(e),
                other => EngineError::Internal(other.to_string()),
            })?;
            (applied, transition)
        };
        let Applied::Written(after) = applied else {
            // The claim holds the row and has just set the epoch: nobody can have moved it.
            error!(run_id = %c.run.id, ?applied, "a claimed run's first transition was not written");
            continue;
        };
        after_commit.push(after);
        let Some(permit) = permits.as_mut().and_then(|p| p.split(1)) else {
            break;
        };
        let lease = Lease {
            copy,
            state,
            next: transition.next,
            uninserted: None,
        };
        leased.push((workflow, lease, permit));
    }
    tx.commit().await?;
    for after in after_commit {
        after.publish(inner);
    }
    for run in parked {
        inner.changes.touch(run);
    }
    let n = leased.len();
    for (workflow, lease, slot) in leased {
        shared.start(engine, workflow, lease, slot);
    }
    Ok(n)
}

async fn listen_loop(mut listener: PgListener, shared: Arc<WorkerShared>, stop: CancellationToken) {
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            received = listener.try_recv() => match received {
                Ok(Some(_)) => shared.wake.notify_one(),
                // The connection was lost and will be re-established: notifications may
                // have been missed, so look for work.
                Ok(None) => shared.wake.notify_one(),
                Err(e) => {
                    debug!(error = %e, "listening for due runs failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
}

async fn heartbeat_loop(engine: &Engine, shared: &WorkerShared, lock: &mut PgConnection, stop: CancellationToken) {
    let every = engine.inner.config.lease_ttl / 3;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        if lock.ping().await.is_err() {
            warn!("the session holding the liveness lock was lost; reconnecting");
            match connect_locked(engine, shared.id).await {
                Ok(conn) => *lock = conn,
                Err(e) => warn!(error = %e, "could not take the liveness lock again yet"),
            }
        }
        let (runs, epochs) = shared.active_leases();
        match store::heartbeat(&engine.inner.worker_pool, shared.id, &runs, &epochs, engine.lease_ms()).await {
            Ok(renewed) => debug!(renewed, "heartbeat"),
            Err(e) => warn!(error = %e, "heartbeat failed"),
        }
    }
}

async fn recovery_loop(engine: Engine, me: i32, stop: CancellationToken) {
    let every = engine.inner.config.recovery_interval;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        recover(&engine, me).await;
    }
}

/// How many cohort runners to start on a pool of `connections`: none when fusion or
/// cohorts are off or a cohort could hold only one run; otherwise as asked, at most a quarter
/// of the connections (each holds one while its cohort runs, beside the lanes' half).
fn cohort_runners(config: &super::EngineConfig, connections: u32) -> Option<usize> {
    let quarter = usize::try_from(connections / 4).unwrap_or(usize::MAX);
    let runners = config.cohort_runners.min(quarter);
    (config.fuse_local_steps && runners > 0 && config.cohort_max_runs > 1).then_some(runners)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cohorts need fusion, room in the pool (a quarter of it at most) and a bound above one.
    #[test]
    fn cohort_runners_are_started_only_when_a_cohort_can_form_and_the_pool_has_room() {
        let config = |runners: usize, max_runs: usize, fuse: bool| super::super::EngineConfig {
            cohort_runners: runners,
            cohort_max_runs: max_runs,
            fuse_local_steps: fuse,
            ..Default::default()
        };
        assert_eq!(cohort_runners(&config(1, 8, true), 24), Some(1));
        assert_eq!(cohort_runners(&config(8, 8, true), 24), Some(6), "a quarter of 24");
        assert_eq!(cohort_runners(&config(1, 8, true), 3), None, "no room in a pool of 3");
        assert_eq!(cohort_runners(&config(0, 8, true), 24), None, "asked for none");
        assert_eq!(
            cohort_runners(&config(1, 1, true), 24),
            None,
            "a cohort of one is no cohort"
        );
        assert_eq!(cohort_runners(&config(1, 8, false), 24), None, "no fusion, no cohorts");
    }
}
