//! Durable waits (DESIGN.md §9) against a real PostgreSQL: signals kept until their wait,
//! consumed once; completions of asynchronous attempts, fenced by attempt, and their
//! heartbeats; sleeps and deadlines on the engine's clock (a manual one: no real long waits);
//! a cancel during a wait; and that a waiting run holds no lease, no worker slot and no
//! connection.

mod common;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use common::scripted::{self, Scripted};
use common::{eventually, fast_config, test_db};
use sagaflow::engine::{
    Clock, Completion, DeliveryOutcome, Engine, EngineError, EventKind as K, ManualClock, OnTimeout, RunStatus, Step,
    StepContext, StepDef, StepError, StepStatus, TriggerOptions, WaitKind, WorkerHandle, Workflow,
};
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(20);
const HOUR: Duration = Duration::from_secs(3600);

/// `reserve` (compensable) → `await-payment` (signal `payment.succeeded`, an hour) → `ship`.
fn order(on_timeout: OnTimeout) -> Workflow {
    Workflow::builder("order", 1)
        .step(StepDef::compensable("reserve", Scripted).retry(scripted::fast_retry(3)))
        .step(StepDef::signal("await-payment", "payment.succeeded", HOUR).on_timeout(on_timeout))
        .step(StepDef::new("ship", Scripted).retry(scripted::fast_retry(3)))
        .build()
        .expect("workflow")
}

/// An asynchronous step: each attempt is accepted and completed from outside.
struct Submit;

#[async_trait]
impl Step for Submit {
    type Output = Value;
    async fn invoke(&self, ctx: &mut StepContext<'_>) -> Result<Value, StepError> {
        ctx.complete_later(json!({"ticket": format!("t-{}", ctx.attempt())}));
        Ok(Value::Null)
    }
}

#[async_trait]
impl sagaflow::engine::Compensate for Submit {
    async fn compensate(
        &self,
        ctx: &mut StepContext<'_>,
        done: sagaflow::engine::Completed<Value>,
    ) -> Result<(), StepError> {
        let received = match done {
            sagaflow::engine::Completed::Output(o) => json!({"output": o}),
            sagaflow::engine::Completed::Partial(p) => json!({"partial": p}),
        };
        sqlx::query("INSERT INTO test_effects (run_id, step, phase, attempt, received) VALUES ($1, $2, $3, $4, $5)")
            .bind(ctx.run_id())
            .bind(ctx.step())
            .bind("compensate")
            .bind(ctx.attempt() as i32)
            .bind(received)
            .execute(ctx.db().await?)
            .await?;
        Ok(())
    }
}

/// `submit` (asynchronous: an hour, a heartbeat every 10 s) → `after`.
fn capture() -> Workflow {
    Workflow::builder("capture", 1)
        .step(StepDef::compensable("submit", Submit).asynchronous(HOUR, Some(Duration::from_secs(10))))
        .step(StepDef::new("after", Scripted))
        .build()
        .expect("workflow")
}

fn sleeper() -> Workflow {
    Workflow::builder("sleeper", 1)
        .step(StepDef::sleep("cool-off", Duration::from_secs(600)))
        .step(StepDef::sleep_until("settle", "/settle_at"))
        .step(StepDef::new("done", Scripted))
        .build()
        .expect("workflow")
}

struct Setup {
    engine: Engine,
    worker: Option<WorkerHandle>,
    clock: Arc<ManualClock>,
}

fn build(pool: &PgPool, node: &str, clock: &Arc<ManualClock>) -> Engine {
    Engine::builder(pool.clone())
        .config(fast_config(node))
        .register(order(OnTimeout::Fail))
        .register({
            let mut w = order(OnTimeout::Continue);
            w = Workflow::builder("order-lenient", 1)
                .step(w.steps()[0].clone())
                .step(w.steps()[1].clone())
                .step(w.steps()[2].clone())
                .build()
                .expect("workflow");
            w
        })
        .register(capture())
        .register(sleeper())
        .clock(clock.clone() as Arc<dyn sagaflow::engine::Clock>)
        .build()
        .expect("engine")
}

async fn setup(pool: &PgPool, with_worker: bool) -> Setup {
    // To the microsecond, as PostgreSQL stores times, so deadlines compare exactly.
    let clock = Arc::new(ManualClock::new(chrono::SubsecRound::trunc_subsecs(Utc::now(), 6)));
    let engine = build(pool, "n1", &clock);
    let worker = if with_worker {
        Some(engine.start_worker().await.expect("worker"))
    } else {
        None
    };
    Setup { engine, worker, clock }
}

async fn trigger(engine: &Engine, workflow: &str, input: Value) -> Uuid {
    engine
        .trigger(workflow, input, TriggerOptions::default())
        .await
        .expect("trigger")
        .run_id
}

async fn finish(engine: &Engine, run: Uuid) -> RunStatus {
    let status = engine.wait_for_terminal(run, WAIT).await.expect("wait");
    assert!(status.is_terminal(), "run {run} still {status} after {WAIT:?}");
    status
}

/// Waits until the run waits (unleased, due at the deadline) and returns its row.
async fn waiting(engine: &Engine, run: Uuid) -> sagaflow::engine::RunDetail {
    eventually(WAIT, "the run to wait", || async {
        let detail = engine.run(run).await.expect("run").expect("exists");
        (detail.run.waiting().is_some() && detail.run.lease_owner.is_none()).then_some(detail)
    })
    .await
}

async fn kinds(engine: &Engine, run: Uuid) -> Vec<(K, Option<String>)> {
    let events = engine.events(run).await.expect("events").expect("run");
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e.seq, i as i32 + 1, "the log of {run} has a gap");
    }
    events.into_iter().map(|e| (e.kind, e.step)).collect()
}

async fn inbox(pool: &PgPool, run: Uuid) -> Vec<(String, Option<String>, Option<String>)> {
    sqlx::query_as("SELECT name, consumed_by, idempotency_key FROM run_inbox WHERE run_id = $1 ORDER BY id")
        .bind(run)
        .fetch_all(pool)
        .await
        .expect("inbox")
}

#[tokio::test]
async fn a_waiting_run_holds_no_lease_and_a_signal_after_the_wait_wakes_it() {
    let db = test_db().await;
    let s = setup(&db.pool, true).await;
    let run = trigger(&s.engine, "order", json!({})).await;
    let detail = waiting(&s.engine, run).await;
    let w = detail.run.waiting().expect("waiting");
    assert_eq!(
        (w.kind, w.name.as_str(), w.step, w.attempt),
        (WaitKind::Signal, "payment.succeeded", 1, 1)
    );
    assert_eq!(
        w.deadline,
        s.clock.now() + chrono::Duration::hours(1),
        "the deadline is on the engine clock"
    );
    assert_eq!(detail.run.status, RunStatus::Running);
    assert_eq!(detail.steps[1].status, StepStatus::Running);
    assert_eq!(
        detail.run.ready_at,
        Some(w.deadline),
        "due at its deadline, so recovery finds it"
    );

    let sent = s
        .engine
        .signal(run, "payment.succeeded", &json!({"charge": "ch_1"}), None)
        .await
        .expect("signal");
    assert_eq!(sent.delivered, DeliveryOutcome::Now);
    assert_eq!(finish(&s.engine, run).await, RunStatus::Completed);
    let done = s.engine.run(run).await.expect("run").expect("exists");
    assert_eq!(
        done.steps[1].output,
        Some(json!({"charge": "ch_1"})),
        "the payload is the step's output"
    );
    assert!(done.run.waiting().is_none());
    let log = kinds(&s.engine, run).await;
    let step = |k: K| (k, Some("await-payment".to_string()));
    let from = log.iter().position(|e| *e == step(K::StepStarted)).expect("started");
    // Waiting, the run was handed back; the signal made it due, and a worker claimed it.
    assert_eq!(
        log[from..from + 5],
        [
            step(K::StepStarted),
            step(K::StepWaiting),
            (K::RunClaimed, None),
            step(K::SignalReceived),
            step(K::StepSucceeded)
        ]
    );
    assert_eq!(
        inbox(&db.pool, run).await,
        [("payment.succeeded".into(), Some("await-payment".into()), None)]
    );
    s.worker.expect("worker").shutdown().await;
}

#[tokio::test]
async fn a_signal_sent_before_the_wait_is_kept_and_consumed_once() {
    let db = test_db().await;
    // No worker yet: the run is accepted but cannot reach its wait.
    let s = setup(&db.pool, false).await;
    let run = trigger(&s.engine, "order", json!({})).await;
    let first = s
        .engine
        .signal(run, "payment.succeeded", &json!({"n": 1}), Some("evt_1"))
        .await
        .expect("signal");
    assert_eq!(first.delivered, DeliveryOutcome::Buffered);
    // The same delivery again (the provider retried its webhook): nothing changes.
    let again = s
        .engine
        .signal(run, "payment.succeeded", &json!({"n": 1}), Some("evt_1"))
        .await
        .expect("signal");
    assert_eq!((again.delivered, again.id), (DeliveryOutcome::Duplicate, first.id));
    // A second, different delivery is kept, not consumed by the same wait.
    let second = s
        .engine
        .signal(run, "payment.succeeded", &json!({"n": 2}), Some("evt_2"))
        .await
        .expect("signal");
    assert_eq!(second.delivered, DeliveryOutcome::Buffered);

    let worker = s.engine.start_worker().await.expect("worker");
    assert_eq!(finish(&s.engine, run).await, RunStatus::Completed);
    let done = s.engine.run(run).await.expect("run").expect("exists");
    assert_eq!(
        done.steps[1].output,
        Some(json!({"n": 1})),
        "the oldest signal is consumed"
    );
    assert_eq!(
        inbox(&db.pool, run).await,
        [
            (
                "payment.succeeded".into(),
                Some("await-payment".into()),
                Some("evt_1".into())
            ),
            ("payment.succeeded".into(), None, Some("evt_2".into())),
        ]
    );
    let received = kinds(&s.engine, run)
        .await
        .iter()
        .filter(|e| e.0 == K::SignalReceived)
        .count();
    assert_eq!(received, 1);
    // A webhook retried after the run finished is still the same delivery, answered as one;
    // a new signal to the finished run is refused.
    let late = s
        .engine
        .signal(run, "payment.succeeded", &json!({"n": 1}), Some("evt_1"))
        .await
        .expect("a duplicate");
    assert_eq!(
        (late.delivered, late.id, late.consumed),
        (DeliveryOutcome::Duplicate, first.id, true)
    );
    let fresh = s
        .engine
        .signal(run, "payment.succeeded", &json!({"n": 3}), Some("evt_3"))
        .await;
    assert!(matches!(fresh, Err(EngineError::RunFinished { .. })), "{fresh:?}");
    assert_eq!(inbox(&db.pool, run).await.len(), 2, "nothing more was kept");
    worker.shutdown().await;
}

#[tokio::test]
async fn signals_to_finished_unknown_or_undeclared_targets_are_refused_and_change_nothing() {
    let db = test_db().await;
    let s = setup(&db.pool, true).await;
    let run = trigger(&s.engine, "order", json!({})).await;
    waiting(&s.engine, run).await;
    let refused = s.engine.signal(run, "payment.failed", &json!({}), None).await;
    assert!(
        matches!(refused, Err(EngineError::UnknownSignal { ref signal, .. }) if signal == "payment.failed"),
        "{refused:?}"
    );
    let nobody = s
        .engine
        .signal(Uuid::now_v7(), "payment.succeeded", &json!({}), None)
        .await;
    assert!(matches!(nobody, Err(EngineError::RunNotFound(_))), "{nobody:?}");
    let bad_key = s.engine.signal(run, "payment.succeeded", &json!({}), Some("")).await;
    assert!(
        matches!(bad_key, Err(EngineError::InvalidIdempotencyKey)),
        "{bad_key:?}"
    );
    assert!(inbox(&db.pool, run).await.is_empty(), "nothing was kept");
    let by_key = s
        .engine
        .signal_by_key("order", "no-such-key", "payment.succeeded", &json!({}), None)
        .await;
    assert!(matches!(by_key, Err(EngineError::RunKeyNotFound { .. })), "{by_key:?}");

    s.engine
        .signal(run, "payment.succeeded", &json!({}), None)
        .await
        .expect("signal");
    assert_eq!(finish(&s.engine, run).await, RunStatus::Completed);
    let after = s.engine.signal(run, "payment.succeeded", &json!({}), None).await;
    assert!(
        matches!(
            after,
            Err(EngineError::RunFinished {
                status: RunStatus::Completed,
                ..
            })
        ),
        "{after:?}"
    );
    assert_eq!(inbox(&db.pool, run).await.len(), 1);
    s.worker.expect("worker").shutdown().await;
}

#[tokio::test]
async fn a_signal_can_be_addressed_by_the_triggers_idempotency_key() {
    let db = test_db().await;
    let s = setup(&db.pool, true).await;
    let options = TriggerOptions {
        idempotency_key: Some("order-123".into()),
        ..TriggerOptions::default()
    };
    let run = s
        .engine
        .trigger("order", json!({}), options)
        .await
        .expect("trigger")
        .run_id;
    waiting(&s.engine, run).await;
    let sent = s
        .engine
        .signal_by_key("order", "order-123", "payment.succeeded", &json!({"by": "key"}), None)
        .await
        .expect("signal");
    assert_eq!((sent.run_id, sent.delivered), (run, DeliveryOutcome::Now));
    assert_eq!(finish(&s.engine, run).await, RunStatus::Completed);
    s.worker.expect("worker").shutdown().await;
}

#[tokio::test]
async fn at_its_deadline_a_wait_fails_and_compensates_or_continues_as_declared() {
    let db = test_db().await;
    let s = setup(&db.pool, true).await;
    let strict = trigger(&s.engine, "order", json!({})).await;
    let lenient = trigger(&s.engine, "order-lenient", json!({})).await;
    waiting(&s.engine, strict).await;
    waiting(&s.engine, lenient).await;
    // Nothing happens while the engine's clock stands still.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        s.engine.run(strict).await.expect("run").expect("exists").run.status,
        RunStatus::Running
    );

    s.clock.advance(HOUR + Duration::from_secs(1));
    assert_eq!(finish(&s.engine, strict).await, RunStatus::Compensated);
    assert_eq!(finish(&s.engine, lenient).await, RunStatus::Completed);

    let failed = s.engine.run(strict).await.expect("run").expect("exists");
    assert_eq!(failed.steps[1].status, StepStatus::Failed);
    assert_eq!(
        failed.steps[0].status,
        StepStatus::Compensated,
        "what was done before is undone"
    );
    let error = failed.run.run_error().expect("error");
    assert_eq!(error.step.as_deref(), Some("await-payment"));
    assert!(error.message.contains("nothing arrived"), "{}", error.message);
    assert!(!error.retryable);
    let log = kinds(&s.engine, strict).await;
    assert!(
        log.contains(&(K::WaitTimedOut, Some("await-payment".into()))),
        "{log:?}"
    );

    let went_on = s.engine.run(lenient).await.expect("run").expect("exists");
    assert_eq!(went_on.steps[1].status, StepStatus::Succeeded);
    assert_eq!(went_on.steps[1].output, Some(Value::Null), "continue: a null output");
    assert_eq!(went_on.steps[2].status, StepStatus::Succeeded);
    s.worker.expect("worker").shutdown().await;
}

#[tokio::test]
async fn a_cancel_during_a_wait_compensates_at_once() {
    let db = test_db().await;
    let s = setup(&db.pool, true).await;
    let run = trigger(&s.engine, "order", json!({})).await;
    waiting(&s.engine, run).await;
    s.engine.cancel(run, "ops").await.expect("cancel");
    // The deadline is an hour away on a clock that stands still: only the cancel can end it.
    assert_eq!(finish(&s.engine, run).await, RunStatus::Cancelled);
    let done = s.engine.run(run).await.expect("run").expect("exists");
    assert_eq!(
        done.steps.iter().map(|s| s.status).collect::<Vec<_>>(),
        [StepStatus::Compensated, StepStatus::Failed, StepStatus::Pending]
    );
    assert!(done.run.waiting().is_none());
    s.worker.expect("worker").shutdown().await;
}

#[tokio::test]
async fn a_sleep_survives_a_restart_of_every_instance_and_ends_on_the_engine_clock() {
    let db = test_db().await;
    let s = setup(&db.pool, true).await;
    let settle_at: DateTime<Utc> = s.clock.now() + chrono::Duration::hours(2);
    let run = trigger(&s.engine, "sleeper", json!({"settle_at": settle_at.to_rfc3339()})).await;
    let first = waiting(&s.engine, run).await;
    let w = first.run.waiting().expect("waiting");
    assert_eq!((w.kind, w.name.as_str()), (WaitKind::Sleep, "cool-off"));
    assert_eq!(w.deadline, s.clock.now() + chrono::Duration::minutes(10));
    // Every instance stops; a new one, on the same clock, takes over.
    s.worker.expect("worker").shutdown().await;
    drop(s.engine);
    let engine = build(&db.pool, "n2", &s.clock);
    let worker = engine.start_worker().await.expect("worker");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let still = engine.run(run).await.expect("run").expect("exists");
    assert_eq!(
        still.run.waiting().map(|w| w.deadline),
        Some(w.deadline),
        "a restart neither ends nor resets it"
    );

    s.clock.advance(Duration::from_secs(601));
    let second = eventually(WAIT, "the second sleep", || async {
        let detail = engine.run(run).await.expect("run").expect("exists");
        detail.run.waiting().filter(|w| w.name == "settle")
    })
    .await;
    assert_eq!(second.deadline, settle_at, "until the moment of the input");
    s.clock.advance(Duration::from_secs(2 * 3600));
    assert_eq!(finish(&engine, run).await, RunStatus::Completed);
    worker.shutdown().await;
}

#[tokio::test]
async fn a_sleep_until_a_moment_passed_ends_at_once_and_a_bad_moment_is_refused_at_trigger() {
    let db = test_db().await;
    let s = setup(&db.pool, true).await;
    let past = (s.clock.now() - chrono::Duration::hours(1)).to_rfc3339();
    // The ten-minute sleep first: move the clock past it.
    let run = trigger(&s.engine, "sleeper", json!({"settle_at": past})).await;
    waiting(&s.engine, run).await;
    s.clock.advance(Duration::from_secs(601));
    assert_eq!(finish(&s.engine, run).await, RunStatus::Completed);

    let cases = [
        (json!({}), "settle_at"),
        (json!({"settle_at": "tomorrow"}), "settle_at"),
        (json!({"settle_at": 5}), "settle_at"),
        (
            json!({"settle_at": (s.clock.now() + chrono::Duration::days(31)).to_rfc3339()}),
            "settle_at",
        ),
    ];
    for (input, field) in cases {
        let refused = s
            .engine
            .trigger("sleeper", input.clone(), TriggerOptions::default())
            .await;
        match refused {
            Err(EngineError::InvalidInput(e)) => assert_eq!(e.field, field, "{input}: {e}"),
            other => panic!("{input}: {other:?}"),
        }
    }
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM runs WHERE workflow = 'sleeper'")
        .fetch_one(&db.pool)
        .await
        .expect("count");
    assert_eq!(runs, 1, "a refused trigger writes nothing");
    s.worker.expect("worker").shutdown().await;
}

#[tokio::test]
async fn a_wait_beyond_the_ceiling_is_refused_at_registration() {
    let db = test_db().await;
    let too_long = Workflow::builder("patient", 1)
        .step(StepDef::signal("forever", "never", Duration::from_secs(31 * 24 * 3600)))
        .build()
        .expect("workflow");
    let refused = Engine::builder(db.pool.clone())
        .config(fast_config("n1"))
        .register(too_long)
        .build();
    assert!(
        matches!(refused, Err(sagaflow::engine::DefinitionError::WaitTooLong { ref step, .. }) if step == "forever"),
        "{:?}",
        refused.err()
    );
}

#[tokio::test]
async fn an_asynchronous_step_completes_from_outside_fenced_by_its_attempt() {
    let db = test_db().await;
    let s = setup(&db.pool, true).await;
    let run = trigger(&s.engine, "capture", json!({})).await;
    let detail = waiting(&s.engine, run).await;
    let w = detail.run.waiting().expect("waiting");
    assert_eq!(
        (w.kind, w.name.as_str(), w.attempt),
        (WaitKind::Completion, "submit", 1)
    );
    assert_eq!(
        w.deadline,
        s.clock.now() + chrono::Duration::seconds(10),
        "the heartbeat timeout is sooner"
    );
    let complete = |attempt: u32, outcome: Result<Value, StepError>| Completion {
        attempt,
        outcome,
        key: None,
    };
    let stale = s.engine.complete_step(run, "submit", complete(2, Ok(json!({})))).await;
    assert!(
        matches!(stale, Err(EngineError::StaleAttempt { attempt: 2, .. })),
        "{stale:?}"
    );
    let not_async = s.engine.complete_step(run, "after", complete(1, Ok(json!({})))).await;
    assert!(
        matches!(not_async, Err(EngineError::NotAsynchronous { .. })),
        "{not_async:?}"
    );
    let no_step = s.engine.complete_step(run, "nope", complete(1, Ok(json!({})))).await;
    assert!(matches!(no_step, Err(EngineError::StepNotFound { .. })), "{no_step:?}");

    let done = s
        .engine
        .complete_step(run, "submit", complete(1, Ok(json!({"captured": true}))))
        .await
        .expect("complete");
    assert_eq!(done.delivered, DeliveryOutcome::Now);
    assert_eq!(finish(&s.engine, run).await, RunStatus::Completed);
    let finished = s.engine.run(run).await.expect("run").expect("exists");
    assert_eq!(finished.steps[0].output, Some(json!({"captured": true})));
    // The same completion again (the participant retried) is a duplicate; another outcome
    // for the same attempt is refused.
    let again = s
        .engine
        .complete_step(run, "submit", complete(1, Ok(json!({"captured": true}))))
        .await
        .expect("a duplicate");
    assert_eq!(
        (again.delivered, again.id, again.consumed),
        (DeliveryOutcome::Duplicate, done.id, true)
    );
    let other = s
        .engine
        .complete_step(run, "submit", complete(1, Ok(json!({"captured": false}))))
        .await;
    assert!(
        matches!(other, Err(EngineError::AlreadyCompleted { attempt: 1, .. })),
        "{other:?}"
    );
    let log = kinds(&s.engine, run).await;
    assert!(
        log.contains(&(K::StepCompletedExternally, Some("submit".into()))),
        "{log:?}"
    );
    s.worker.expect("worker").shutdown().await;
}

#[tokio::test]
async fn a_completion_with_an_error_fails_the_step_and_compensates_its_accepted_work() {
    let db = test_db().await;
    let s = setup(&db.pool, true).await;
    let run = trigger(&s.engine, "capture", json!({})).await;
    waiting(&s.engine, run).await;
    let failure = Completion {
        attempt: 1,
        outcome: Err(StepError::permanent("card declined")),
        key: Some("cb-1".into()),
    };
    s.engine.complete_step(run, "submit", failure).await.expect("complete");
    assert_eq!(finish(&s.engine, run).await, RunStatus::Compensated);
    let done = s.engine.run(run).await.expect("run").expect("exists");
    assert_eq!(done.steps[0].status, StepStatus::Compensated);
    let received: Value = sqlx::query_scalar("SELECT received FROM test_effects WHERE run_id = $1 AND step = 'submit'")
        .bind(run)
        .fetch_one(&db.pool)
        .await
        .expect("compensated");
    assert_eq!(
        received,
        json!({"partial": {"ticket": "t-1"}}),
        "the compensation gets what was accepted"
    );
    s.worker.expect("worker").shutdown().await;
}

#[tokio::test]
async fn heartbeats_keep_an_asynchronous_step_alive_and_a_missing_one_lets_it_time_out() {
    let db = test_db().await;
    let s = setup(&db.pool, true).await;
    let run = trigger(&s.engine, "capture", json!({})).await;
    let first = waiting(&s.engine, run).await.run.waiting().expect("waiting").deadline;
    for _ in 0..3 {
        s.clock.advance(Duration::from_secs(8));
        let deadline = s.engine.heartbeat(run, "submit", 1).await.expect("heartbeat");
        assert_eq!(deadline, Some(s.clock.now() + chrono::Duration::seconds(10)));
    }
    // 24 s in, long past the first deadline: alive because of its heartbeats.
    assert!(s.clock.now() > first);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let alive = s.engine.run(run).await.expect("run").expect("exists");
    assert_eq!(alive.run.status, RunStatus::Running);
    assert_eq!(
        alive.run.waiting().map(|w| w.deadline),
        Some(s.clock.now() + chrono::Duration::seconds(10))
    );
    let stale = s.engine.heartbeat(run, "submit", 7).await;
    assert!(matches!(stale, Err(EngineError::StaleAttempt { .. })), "{stale:?}");

    // No heartbeat for 11 s: the wait times out and the run compensates.
    s.clock.advance(Duration::from_secs(11));
    assert_eq!(finish(&s.engine, run).await, RunStatus::Compensated);
    let late = Completion {
        attempt: 1,
        outcome: Ok(json!({})),
        key: None,
    };
    let refused = s.engine.complete_step(run, "submit", late).await;
    assert!(matches!(refused, Err(EngineError::RunFinished { .. })), "{refused:?}");
    s.worker.expect("worker").shutdown().await;
}

#[tokio::test]
async fn the_checker_holds_waits_to_their_rules_and_sees_each_broken() {
    let db = test_db().await;
    let s = setup(&db.pool, true).await;
    let signalled = trigger(&s.engine, "order", json!({})).await;
    let completed = trigger(&s.engine, "capture", json!({})).await;
    let waits = trigger(&s.engine, "order", json!({})).await;
    waiting(&s.engine, signalled).await;
    waiting(&s.engine, completed).await;
    waiting(&s.engine, waits).await;
    s.engine
        .signal(signalled, "payment.succeeded", &json!({}), None)
        .await
        .expect("signal");
    let completion = Completion {
        attempt: 1,
        outcome: Ok(json!({})),
        key: None,
    };
    s.engine
        .complete_step(completed, "submit", completion)
        .await
        .expect("complete");
    finish(&s.engine, signalled).await;
    finish(&s.engine, completed).await;
    let rules = |found: &[sagaflow::check::Violation]| found.iter().map(|v| (v.rule, v.run_id)).collect::<Vec<_>>();
    let clean = sagaflow::check::violations(&db.pool, &s.engine).await.expect("check");
    assert_eq!(rules(&clean), [], "{clean:?}");
    s.worker.expect("worker").shutdown().await;

    // A wait whose due time is past its deadline (recovery would end it late, or never).
    sqlx::query("UPDATE runs SET ready_at = wait_deadline + interval '1 day' WHERE id = $1")
        .bind(waits)
        .execute(&db.pool)
        .await
        .expect("tamper");
    // A delivery marked consumed that no wait consumed.
    sqlx::query(
        "INSERT INTO run_inbox (run_id, kind, name, consumed_at, consumed_by)
         VALUES ($1, 'signal', 'payment.succeeded', now(), 'await-payment')",
    )
    .bind(signalled)
    .execute(&db.pool)
    .await
    .expect("tamper");
    // The completion recorded as if for another attempt than the one that waited.
    sqlx::query("UPDATE run_inbox SET attempt = 7 WHERE run_id = $1")
        .bind(completed)
        .execute(&db.pool)
        .await
        .expect("tamper");
    let found = sagaflow::check::violations(&db.pool, &s.engine).await.expect("check");
    let found = rules(&found);
    for expected in [
        ("wait-has-deadline", Some(waits)),
        ("signal-consumed-once", Some(signalled)),
        ("completion-for-current-attempt", Some(completed)),
    ] {
        assert!(found.contains(&expected), "{expected:?} not in {found:?}");
    }
}
