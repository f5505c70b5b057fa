//! The engine against a real PostgreSQL: every scenario of docs/contract.md §3, each checked
//! event by event in the execution log, and the effects the steps wrote counted exactly.

mod common;

use std::time::Duration;

use common::scripted::{self, gate};
use common::{eventually, fast_config, test_db};
use sagaflow::engine::testing::{self as store, LeaseWrite, Persist, Persisted};
use sagaflow::engine::{
    Engine, EngineError, EventKind as K, Handler, ManualClock, Retried, RetryPolicy, RunStatus, Step, StepContext,
    StepDef, StepError, StepStatus, TriggerOptions, WorkerHandle, Workflow,
};
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(20);

fn engine(pool: &PgPool, node: &str) -> Engine {
    Engine::builder(pool.clone())
        .config(fast_config(node))
        .register(scripted::workflow())
        .build()
        .expect("engine")
}

async fn started(pool: &PgPool, node: &str) -> (Engine, WorkerHandle) {
    let engine = engine(pool, node);
    let worker = engine.start_worker().await.expect("worker");
    (engine, worker)
}

async fn trigger(engine: &Engine, input: Value) -> Uuid {
    engine
        .trigger(scripted::NAME, input, TriggerOptions::default())
        .await
        .expect("trigger")
        .run_id
}

async fn finish(engine: &Engine, run: Uuid) -> RunStatus {
    let status = engine.wait_for_terminal(run, WAIT).await.expect("wait");
    assert!(status.is_terminal(), "run {run} still {status} after {WAIT:?}");
    status
}

/// The log as (kind, step, attempt), checking that sequence numbers run 1, 2, 3... and time
/// never goes backwards.
async fn log(engine: &Engine, run: Uuid) -> Vec<(K, Option<String>, Option<i32>)> {
    let events = engine.events(run).await.expect("events").expect("run exists");
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e.seq, i as i32 + 1, "log of {run} has a gap or is out of order");
    }
    assert!(events.windows(2).all(|w| w[0].at <= w[1].at), "log times go backwards");
    events.into_iter().map(|e| (e.kind, e.step, e.attempt)).collect()
}

fn ev(kind: K, step: Option<&str>, attempt: Option<i32>) -> (K, Option<String>, Option<i32>) {
    (kind, step.map(str::to_string), attempt)
}

fn run_level(kind: K) -> (K, Option<String>, Option<i32>) {
    ev(kind, None, None)
}

fn at(kind: K, step: &str, attempt: i32) -> (K, Option<String>, Option<i32>) {
    ev(kind, Some(step), Some(attempt))
}

/// Effects written by successful attempts, as (step, phase, attempt), in order.
async fn effects(pool: &PgPool, run: Uuid) -> Vec<(String, String, i32)> {
    sqlx::query_as("SELECT step, phase, attempt FROM test_effects WHERE run_id = $1 ORDER BY at")
        .bind(run)
        .fetch_all(pool)
        .await
        .expect("effects")
}

fn effect(step: &str, phase: &str, attempt: i32) -> (String, String, i32) {
    (step.into(), phase.into(), attempt)
}

async fn step_statuses(engine: &Engine, run: Uuid) -> Vec<StepStatus> {
    engine
        .run(run)
        .await
        .expect("run")
        .expect("exists")
        .steps
        .iter()
        .map(|s| s.status)
        .collect()
}

#[tokio::test]
async fn happy_path_runs_each_step_once_and_logs_every_transition() {
    let db = test_db().await;
    let (engine, worker) = started(&db.pool, "n1").await;
    let run = trigger(&engine, json!({"subject": "a@b.co"})).await;
    assert_eq!(finish(&engine, run).await, RunStatus::Completed);

    assert_eq!(
        log(&engine, run).await,
        [
            run_level(K::RunCreated),
            run_level(K::RunClaimed),
            at(K::StepStarted, "a", 1),
            at(K::StepSucceeded, "a", 1),
            at(K::StepStarted, "b", 1),
            at(K::StepSucceeded, "b", 1),
            at(K::StepStarted, "c", 1),
            at(K::StepSucceeded, "c", 1),
            at(K::StepStarted, "d", 1),
            at(K::StepSucceeded, "d", 1),
            run_level(K::RunCompleted),
        ]
    );
    assert_eq!(
        effects(&db.pool, run).await,
        [
            effect("a", "invoke", 1),
            effect("b", "invoke", 1),
            effect("c", "invoke", 1),
            effect("d", "invoke", 1)
        ]
    );
    let detail = engine.run(run).await.expect("run").expect("exists");
    assert_eq!(detail.run.output, Some(json!({"step": "d", "attempt": 1})));
    assert_eq!(detail.run.subject.as_deref(), Some("a@b.co"));
    assert!(detail.run.finished_at.is_some() && detail.run.lease_owner.is_none() && detail.run.ready_at.is_none());
    assert!(
        detail
            .steps
            .iter()
            .all(|s| s.attempts == 1 && s.started_at.is_some() && s.finished_at >= s.started_at)
    );
    assert_eq!(detail.steps[1].output, Some(json!({"step": "b", "attempt": 1})));
    worker.shutdown().await;
}

/// A run's writes between its start and its end change nothing an index of `runs` reads, so
/// PostgreSQL makes them HOT updates (migration 0019): no index entry, the old version pruned
/// in its page. Of a run of four steps that are not local (one commit each), the three
/// outcomes that keep it running are HOT; only its claim, if it was not started in its
/// insert, and its end move the row.
#[tokio::test]
async fn a_run_s_writes_between_its_start_and_its_end_are_hot_updates() {
    let db = test_db().await;
    let (engine, worker) = started(&db.pool, "hot").await;
    let run = trigger(&engine, json!({})).await;
    assert_eq!(finish(&engine, run).await, RunStatus::Completed);
    worker.shutdown().await;
    drop(engine);
    // A backend reports its counts when it exits (idle, only every few seconds).
    db.pool.close().await;
    let pool = PgPool::connect(&db.url).await.expect("connect");
    let (updates, hot) = eventually(Duration::from_secs(20), "the counts of the run's writes", || async {
        let counts: (i64, i64) =
            sqlx::query_as("SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'runs'")
                .fetch_one(&pool)
                .await
                .expect("counts");
        (counts.0 >= 4).then_some(counts)
    })
    .await;
    assert!(
        hot >= 3 && updates - hot <= 2,
        "{updates} updates of the run, {hot} of them HOT: the three outcomes that keep it running should be"
    );
    pool.close().await;
}

#[tokio::test]
async fn a_retryable_failure_is_retried_after_a_durable_backoff() {
    let db = test_db().await;
    let (engine, worker) = started(&db.pool, "n1").await;
    let run = trigger(&engine, json!({"fail": {"b": 2}})).await;
    assert_eq!(finish(&engine, run).await, RunStatus::Completed);
    assert_eq!(
        log(&engine, run).await,
        [
            run_level(K::RunCreated),
            run_level(K::RunClaimed),
            at(K::StepStarted, "a", 1),
            at(K::StepSucceeded, "a", 1),
            at(K::StepStarted, "b", 1),
            at(K::StepFailed, "b", 1),
            at(K::RetryScheduled, "b", 2),
            run_level(K::RunClaimed),
            at(K::StepStarted, "b", 2),
            at(K::StepFailed, "b", 2),
            at(K::RetryScheduled, "b", 3),
            run_level(K::RunClaimed),
            at(K::StepStarted, "b", 3),
            at(K::StepSucceeded, "b", 3),
            at(K::StepStarted, "c", 1),
            at(K::StepSucceeded, "c", 1),
            at(K::StepStarted, "d", 1),
            at(K::StepSucceeded, "d", 1),
            run_level(K::RunCompleted),
        ]
    );
    // The backoff doubles (20 ms, then 40 ms) and the next attempt waits for it.
    let events = engine.events(run).await.expect("events").expect("exists");
    let retries: Vec<&sagaflow::engine::EventRow> = events.iter().filter(|e| e.kind == K::RetryScheduled).collect();
    assert_eq!(retries[0].detail["delay_ms"], json!(20));
    assert_eq!(retries[1].detail["delay_ms"], json!(40));
    for retry in retries {
        let due: chrono::DateTime<chrono::Utc> =
            serde_json::from_value(retry.detail["at"].clone()).expect("retry time");
        let next_start = events
            .iter()
            .find(|e| e.seq > retry.seq && e.kind == K::StepStarted)
            .expect("next attempt");
        assert!(
            next_start.at >= due,
            "attempt started at {} before its retry time {due}",
            next_start.at
        );
    }
    assert_eq!(effects(&db.pool, run).await.iter().filter(|e| e.0 == "b").count(), 1);
    let b = &engine.run(run).await.expect("run").expect("exists").steps[1];
    assert_eq!((b.status, b.attempts), (StepStatus::Succeeded, 3));
    worker.shutdown().await;
}

/// The engine's due times are on its clock: an hour's backoff is waited for by moving a
/// manual clock, not in real time, and the dispatcher wakes when the clock reaches the retry
/// (its poll interval is a minute, so nothing else could claim the run within the test).
#[tokio::test]
async fn a_backoff_is_waited_for_on_the_engine_clock() {
    let db = test_db().await;
    // To the microsecond: the engine's times are kept as PostgreSQL keeps them.
    let start = chrono::SubsecRound::trunc_subsecs(chrono::Utc::now(), 6);
    let clock = std::sync::Arc::new(ManualClock::new(start));
    let hour = Duration::from_secs(3600);
    let workflow = Workflow::builder("hourly-retry", 1)
        .step(
            StepDef::new("a", scripted::Scripted)
                .retry(RetryPolicy::attempts(2).initial_delay(hour).max_delay(hour).jitter(0.0)),
        )
        .build()
        .expect("workflow");
    let engine = Engine::builder(db.pool.clone())
        .config(sagaflow::engine::EngineConfig {
            poll_interval: Duration::from_secs(60),
            ..fast_config("n1")
        })
        .register(workflow)
        .clock(clock.clone())
        .build()
        .expect("engine");
    let worker = engine.start_worker().await.expect("worker");
    let run = engine
        .trigger("hourly-retry", json!({"fail": {"a": 1}}), TriggerOptions::default())
        .await
        .expect("trigger")
        .run_id;
    let retry = eventually(WAIT, "the retry to be scheduled", || async {
        let events = engine.events(run).await.expect("events").expect("run");
        events.into_iter().find(|e| e.kind == K::RetryScheduled)
    })
    .await;
    let due: chrono::DateTime<chrono::Utc> = serde_json::from_value(retry.detail["at"].clone()).expect("retry time");
    assert_eq!(
        due,
        start + chrono::Duration::from_std(hour).expect("hour"),
        "stamped with the engine clock"
    );

    // The clock stands still: the retry is not due, however long we wait in real time.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let detail = engine.run(run).await.expect("run").expect("exists");
    assert_eq!((detail.run.status, detail.steps[0].attempts), (RunStatus::Running, 1));
    // PostgreSQL keeps microseconds.
    assert_eq!(
        detail.run.ready_at.map(|t| t.timestamp_micros()),
        Some(due.timestamp_micros())
    );

    clock.advance(hour);
    assert_eq!(finish(&engine, run).await, RunStatus::Completed);
    let a = &engine.run(run).await.expect("run").expect("exists").steps[0];
    assert_eq!((a.status, a.attempts), (StepStatus::Succeeded, 2));
    worker.shutdown().await;
}

#[tokio::test]
async fn exhausted_retries_compensate_in_reverse_order() {
    let db = test_db().await;
    let (engine, worker) = started(&db.pool, "n1").await;
    // d gets a single attempt.
    let run = trigger(&engine, json!({"fail": {"d": 5}})).await;
    assert_eq!(finish(&engine, run).await, RunStatus::Compensated);
    assert_eq!(
        log(&engine, run).await[8..],
        [
            at(K::StepStarted, "d", 1),
            at(K::StepFailed, "d", 1),
            run_level(K::CompensationStarted),
            at(K::StepCompensationStarted, "c", 1),
            at(K::StepCompensationSucceeded, "c", 1),
            at(K::StepCompensationStarted, "b", 1),
            at(K::StepCompensationSucceeded, "b", 1),
            run_level(K::RunCompensated),
        ]
    );
    assert_eq!(
        effects(&db.pool, run).await,
        [
            effect("a", "invoke", 1),
            effect("b", "invoke", 1),
            effect("c", "invoke", 1),
            effect("c", "compensate", 1),
            effect("b", "compensate", 1),
        ]
    );
    assert_eq!(
        step_statuses(&engine, run).await,
        [
            StepStatus::Succeeded,
            StepStatus::Compensated,
            StepStatus::Compensated,
            StepStatus::Failed
        ]
    );
    let error = engine
        .run(run)
        .await
        .expect("run")
        .expect("exists")
        .run
        .error
        .expect("error kept");
    assert_eq!(
        error,
        json!({"step": "d", "message": "d attempt 1 failed", "retryable": true})
    );
    worker.shutdown().await;
}

#[tokio::test]
async fn a_permanent_error_skips_the_remaining_retries() {
    let db = test_db().await;
    let (engine, worker) = started(&db.pool, "n1").await;
    let run = trigger(&engine, json!({"permanent": {"c": true}})).await;
    assert_eq!(finish(&engine, run).await, RunStatus::Compensated);
    assert_eq!(
        log(&engine, run).await[6..],
        [
            at(K::StepStarted, "c", 1),
            at(K::StepFailed, "c", 1),
            run_level(K::CompensationStarted),
            at(K::StepCompensationStarted, "b", 1),
            at(K::StepCompensationSucceeded, "b", 1),
            run_level(K::RunCompensated),
        ]
    );
    let c = &engine.run(run).await.expect("run").expect("exists").steps[2];
    assert_eq!((c.status, c.attempts), (StepStatus::Failed, 1), "no second attempt");
    assert_eq!(c.error.as_ref().map(|e| e["retryable"].clone()), Some(json!(false)));
    worker.shutdown().await;
}

#[tokio::test]
async fn a_failing_step_that_recorded_partial_work_is_compensated_with_it() {
    let db = test_db().await;
    let (engine, worker) = started(&db.pool, "n1").await;
    let run = trigger(&engine, json!({"permanent": {"c": true}, "partial": {"c": true}})).await;
    assert_eq!(finish(&engine, run).await, RunStatus::Compensated);
    let compensated: Vec<_> = effects(&db.pool, run)
        .await
        .into_iter()
        .filter(|e| e.1 == "compensate")
        .map(|e| e.0)
        .collect();
    assert_eq!(
        compensated,
        ["c", "b"],
        "the failing step's partial work is undone first"
    );
    let c = &engine.run(run).await.expect("run").expect("exists").steps[2];
    assert_eq!(c.partial, Some(json!({"half": "c"})));
    // What each compensation was handed: the failing step its partial work, the step that
    // succeeded its own output.
    let received: Vec<(String, Value)> = sqlx::query_as(
        "SELECT step, received FROM test_effects WHERE run_id = $1 AND phase = 'compensate' ORDER BY at",
    )
    .bind(run)
    .fetch_all(&db.pool)
    .await
    .expect("received");
    assert_eq!(
        received,
        [
            ("c".to_string(), json!({"partial": {"half": "c"}})),
            ("b".to_string(), json!({"output": {"step": "b", "attempt": 1}})),
        ]
    );
    worker.shutdown().await;
}

#[tokio::test]
async fn a_compensation_that_gives_up_fails_the_run_and_an_operator_resumes_it() {
    let db = test_db().await;
    let (engine, worker) = started(&db.pool, "n1").await;
    // c's compensation has 2 attempts; both fail. Then the cause is fixed and an operator
    // retries with a fresh budget.
    sqlx::query("INSERT INTO test_switches VALUES ('broken')")
        .execute(&db.pool)
        .await
        .expect("switch");
    let run = trigger(&engine, json!({"fail": {"d": 1}, "comp_fail_while": {"c": "broken"}})).await;
    assert_eq!(finish(&engine, run).await, RunStatus::Failed);
    assert_eq!(
        log(&engine, run).await[10..],
        [
            run_level(K::CompensationStarted),
            at(K::StepCompensationStarted, "c", 1),
            at(K::StepCompensationFailed, "c", 1),
            at(K::RetryScheduled, "c", 2),
            run_level(K::RunClaimed),
            at(K::StepCompensationStarted, "c", 2),
            at(K::StepCompensationFailed, "c", 2),
            run_level(K::RunFailed),
        ]
    );
    assert_eq!(
        step_statuses(&engine, run).await,
        [
            StepStatus::Succeeded,
            StepStatus::Succeeded,
            StepStatus::CompensationFailed,
            StepStatus::Failed
        ]
    );

    sqlx::query("DELETE FROM test_switches")
        .execute(&db.pool)
        .await
        .expect("fix");
    assert_eq!(
        engine.retry(run, "ops@example.com").await.expect("retry"),
        Retried::Resumed(run)
    );
    assert_eq!(finish(&engine, run).await, RunStatus::Compensated);
    let events = engine.events(run).await.expect("events").expect("exists");
    let retry = events
        .iter()
        .find(|e| e.kind == K::OperatorRetry)
        .expect("operator retry logged");
    assert_eq!(retry.detail["by"], json!("ops@example.com"));
    assert_eq!(
        log(&engine, run).await[18..],
        [
            run_level(K::OperatorRetry),
            run_level(K::RunClaimed),
            at(K::StepCompensationStarted, "c", 1),
            at(K::StepCompensationSucceeded, "c", 1),
            at(K::StepCompensationStarted, "b", 1),
            at(K::StepCompensationSucceeded, "b", 1),
            run_level(K::RunCompensated),
        ]
    );
    worker.shutdown().await;
}

#[tokio::test]
async fn a_false_when_condition_skips_the_step() {
    let db = test_db().await;
    let (engine, worker) = started(&db.pool, "n1").await;
    let run = trigger(&engine, json!({"skip": ["d"]})).await;
    assert_eq!(finish(&engine, run).await, RunStatus::Completed);
    assert_eq!(
        log(&engine, run).await[7..],
        [
            at(K::StepSucceeded, "c", 1),
            ev(K::StepSkipped, Some("d"), None),
            run_level(K::RunCompleted)
        ]
    );
    assert_eq!(
        step_statuses(&engine, run).await,
        [
            StepStatus::Succeeded,
            StepStatus::Succeeded,
            StepStatus::Succeeded,
            StepStatus::Skipped
        ]
    );
    assert!(effects(&db.pool, run).await.iter().all(|e| e.0 != "d"));
    worker.shutdown().await;
}

#[tokio::test]
async fn an_attempt_over_its_timeout_fails_and_is_retried() {
    let db = test_db().await;
    let (engine, worker) = started(&db.pool, "n1").await;
    // c's timeout is 300 ms; its first attempt sleeps 2 s.
    let run = trigger(&engine, json!({"sleep_ms": {"c": 2000}, "sleep_attempts": {"c": 1}})).await;
    let started = std::time::Instant::now();
    assert_eq!(finish(&engine, run).await, RunStatus::Completed);
    assert!(
        started.elapsed() < Duration::from_millis(1900),
        "the slow attempt was not cut off"
    );
    let events = engine.events(run).await.expect("events").expect("exists");
    let failed = events
        .iter()
        .find(|e| e.kind == K::StepFailed)
        .expect("timed-out attempt");
    assert_eq!(failed.step.as_deref(), Some("c"));
    assert!(
        failed.detail["error"].as_str().is_some_and(|m| m.contains("timed out")),
        "{}",
        failed.detail
    );
    assert_eq!(effects(&db.pool, run).await.iter().filter(|e| e.0 == "c").count(), 1);
    worker.shutdown().await;
}

#[tokio::test]
async fn hook_points_are_no_ops_until_the_application_registers_a_handler() {
    struct Greeter;
    #[async_trait::async_trait]
    impl Step for Greeter {
        type Output = String;
        async fn invoke(&self, ctx: &mut StepContext<'_>) -> Result<String, StepError> {
            let name: String = ctx.input::<Value>()?["name"].as_str().unwrap_or("?").to_string();
            let first: Value = ctx.output("first")?;
            Ok(format!("hello {name} after {}", first))
        }
    }
    struct First;
    #[async_trait::async_trait]
    impl Step for First {
        type Output = u32;
        async fn invoke(&self, _: &mut StepContext<'_>) -> Result<u32, StepError> {
            Ok(7)
        }
    }
    let definition = || {
        Workflow::builder("hooked", 1)
            .step(sagaflow::engine::StepDef::new("first", First))
            .step(sagaflow::engine::StepDef::hook("greet"))
            .build()
            .expect("valid")
    };
    let db = test_db().await;
    let plain = Engine::builder(db.pool.clone())
        .config(fast_config("n1"))
        .register(definition())
        .build()
        .expect("engine");
    let worker = plain.start_worker().await.expect("worker");
    let run = plain
        .trigger("hooked", json!({"name": "ada"}), TriggerOptions::default())
        .await
        .expect("trigger")
        .run_id;
    assert_eq!(finish(&plain, run).await, RunStatus::Completed);
    assert_eq!(
        plain.run(run).await.expect("run").expect("exists").steps[1].output,
        Some(Value::Null)
    );
    worker.shutdown().await;

    let hooked = Engine::builder(db.pool.clone())
        .config(fast_config("n2"))
        .register(definition())
        .hook("hooked", "greet", Handler::new(Greeter))
        .build()
        .expect("engine");
    let worker = hooked.start_worker().await.expect("worker");
    let run = hooked
        .trigger("hooked", json!({"name": "ada"}), TriggerOptions::default())
        .await
        .expect("trigger")
        .run_id;
    assert_eq!(finish(&hooked, run).await, RunStatus::Completed);
    assert_eq!(
        hooked.run(run).await.expect("run").expect("exists").run.output,
        Some(json!("hello ada after 7"))
    );
    worker.shutdown().await;

    let unknown = Engine::builder(db.pool.clone())
        .register(definition())
        .hook("hooked", "first", Handler::new(Greeter))
        .build();
    assert!(unknown.is_err(), "only hook points take hook handlers");

    // A hook handler with a batch form must be local, as a step's must.
    #[async_trait::async_trait]
    impl sagaflow::engine::BatchStep for First {
        async fn invoke_batch(
            &self,
            _: &mut sqlx::PgConnection,
            items: &[sagaflow::engine::BatchItem<'_>],
        ) -> Result<Vec<Result<u32, StepError>>, StepError> {
            Ok(items.iter().map(|_| Ok(7)).collect())
        }
    }
    let batched = Engine::builder(db.pool.clone())
        .register(definition())
        .hook("hooked", "greet", Handler::new(First).batch(First))
        .build();
    assert!(
        matches!(
            batched,
            Err(sagaflow::engine::DefinitionError::BatchNotLocal { ref workflow, ref step })
                if workflow == "hooked" && step == "greet"
        ),
        "a batched hook handler that is not local is refused"
    );
    let local = Engine::builder(db.pool.clone())
        .register(definition())
        .hook("hooked", "greet", Handler::new(First).local().batch(First))
        .build();
    assert!(local.is_ok(), "a local one is taken");
}

#[tokio::test]
async fn a_taken_over_lease_fences_the_old_owners_late_commit() {
    let db = test_db().await;
    // A holds one run at a time and renews its lease rarely, so expiring it is up to the test.
    let a = Engine::builder(db.pool.clone())
        .config(sagaflow::engine::EngineConfig {
            lease_ttl: Duration::from_secs(60),
            max_concurrent_runs: 1,
            ..fast_config("node-a")
        })
        .register(scripted::workflow())
        .build()
        .expect("engine");
    let worker_a = a.start_worker().await.expect("worker a");
    let run = trigger(&a, json!({"block": {"b": 1}})).await;
    let gate = gate(run);
    gate.wait_entered().await; // A is inside b: its effect is written but not committed.

    // The lease runs out (A is alive but, say, paused): B's recovery makes it claimable.
    sqlx::query("UPDATE runs SET lease_expires_at = now() - interval '1 second' WHERE id = $1")
        .bind(run)
        .execute(&db.pool)
        .await
        .expect("expire lease");
    let (b, worker_b) = started(&db.pool, "node-b").await;
    assert_eq!(finish(&b, run).await, RunStatus::Completed);

    // A wakes up and tries to commit b's attempt 1: refused.
    gate.release();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        effects(&db.pool, run).await,
        [
            effect("a", "invoke", 1),
            effect("b", "invoke", 2),
            effect("c", "invoke", 1),
            effect("d", "invoke", 1)
        ],
        "A's effect for b (attempt 1) never committed"
    );
    let entries = log(&b, run).await;
    assert_eq!(
        entries[..10],
        [
            run_level(K::RunCreated),
            run_level(K::RunClaimed),
            at(K::StepStarted, "a", 1),
            at(K::StepSucceeded, "a", 1),
            at(K::StepStarted, "b", 1),
            run_level(K::LeaseTakenOver),
            at(K::StepFailed, "b", 1),
            at(K::StepStarted, "b", 2),
            at(K::StepSucceeded, "b", 2),
            at(K::StepStarted, "c", 1),
        ]
    );
    assert_eq!(entries.last(), Some(&run_level(K::RunCompleted)));
    assert!(
        !entries[10..]
            .iter()
            .any(|e| e.2 == Some(1) && e.1.as_deref() == Some("b")),
        "nothing from A after the takeover"
    );
    let events = b.events(run).await.expect("events").expect("exists");
    let takeover = events.iter().find(|e| e.kind == K::LeaseTakenOver).expect("takeover");
    assert!(
        takeover.detail["from"]
            .as_str()
            .is_some_and(|f| f.starts_with("node-a#")),
        "{}",
        takeover.detail
    );
    assert!(
        takeover.detail["by"].as_str().is_some_and(|f| f.starts_with("node-b#")),
        "{}",
        takeover.detail
    );
    worker_b.shutdown().await;
    worker_a.shutdown().await;
}

/// A claim of one due `scripted` run by `worker`, made by hand, with a one-minute lease.
async fn claim_by_hand(pool: &PgPool, worker: i32) -> Vec<store::Claimed> {
    let mut tx = pool.begin().await.expect("tx");
    let claimed = store::claim(
        &mut tx,
        worker,
        1,
        60_000,
        &["scripted@1".to_string()],
        chrono::Utc::now(),
    )
    .await
    .expect("claim");
    tx.commit().await.expect("commit");
    claimed
}

#[tokio::test]
async fn a_write_under_an_old_epoch_changes_nothing() {
    let db = test_db().await;
    let engine = engine(&db.pool, "n1");
    // No worker: the run stays pending; claim it by hand to get a lease.
    let run = trigger(&engine, json!({})).await;
    let worker_id = store::register_worker(&db.pool, "manual").await.expect("worker");
    let claimed = claim_by_hand(&db.pool, worker_id).await;
    assert_eq!(claimed.len(), 1);
    let old_epoch = claimed[0].run.lease_epoch;
    // Someone else takes it over.
    sqlx::query("UPDATE runs SET ready_at = now() WHERE id = $1")
        .bind(run)
        .execute(&db.pool)
        .await
        .expect("expire");
    let retaken = claim_by_hand(&db.pool, worker_id).await;
    assert_eq!(retaken[0].run.lease_epoch, old_epoch + 1);

    let before = engine.run(run).await.expect("run").expect("exists");
    let before_log = engine.events(run).await.expect("events").expect("exists").len();
    let mut state = store::run_state(&before.run, &before.steps);
    state.status = RunStatus::Completed;
    let times = Default::default();
    let events = [sagaflow::engine::machine::NewEvent {
        kind: K::RunCompleted,
        step: None,
        attempt: None,
        detail: json!({}),
    }];
    let mut conn = db.pool.acquire().await.expect("conn");
    let outcome = store::persist(
        &mut conn,
        &Persist {
            run_id: run,
            epoch: old_epoch,
            cancel_requested: false,
            pause_requested: false,
            state: &state,
            changed: vec![0, 1, 2, 3],
            times: &times,
            events: &events,
            events_ago_us: &[],
            lease: LeaseWrite::Finish,
        },
    )
    .await
    .expect("persist");
    assert_eq!(outcome, Persisted::Fenced);
    let after = engine.run(run).await.expect("run").expect("exists");
    assert_eq!(after.run.status, before.run.status);
    assert_eq!(after.run.lease_epoch, old_epoch + 1);
    assert_eq!(
        engine.events(run).await.expect("events").expect("exists").len(),
        before_log
    );
}

#[tokio::test]
async fn a_crashed_engine_s_run_is_finished_by_a_new_one_with_each_effect_once() {
    let db = test_db().await;
    let (a, worker_a) = started(&db.pool, "node-a").await;
    let run = trigger(&a, json!({"block": {"c": 1}})).await;
    gate(run).wait_entered().await; // inside c, effect written, not committed
    worker_a.abandon().await; // as if the process died: nothing given back

    let (b, worker_b) = started(&db.pool, "node-b").await;
    let started = std::time::Instant::now();
    assert_eq!(finish(&b, run).await, RunStatus::Completed);
    // A's liveness lock went with its session: no lease wait (the lease is 5 s).
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(
        effects(&db.pool, run).await,
        [
            effect("a", "invoke", 1),
            effect("b", "invoke", 1),
            effect("c", "invoke", 2),
            effect("d", "invoke", 1)
        ]
    );
    let entries = log(&b, run).await;
    assert_eq!(
        entries[6..10],
        [
            at(K::StepStarted, "c", 1),
            run_level(K::LeaseTakenOver),
            at(K::StepFailed, "c", 1),
            at(K::StepStarted, "c", 2)
        ]
    );
    worker_b.shutdown().await;
}

#[tokio::test]
async fn a_restarted_node_resumes_its_runs_at_once() {
    use sqlx::Connection;
    let db = test_db().await;
    let (a, worker_a) = started(&db.pool, "same-node").await;
    let run = trigger(&a, json!({"block": {"b": 1}})).await;
    gate(run).wait_entered().await;
    worker_a.abandon().await;
    // Its liveness lock looks held (as if its database session outlived it): only the node's
    // restart can tell the runs are orphaned before the lease expires.
    let old: i32 = sqlx::query_scalar("SELECT id FROM workers WHERE node_id = 'same-node'")
        .fetch_one(&db.pool)
        .await
        .expect("old incarnation");
    let mut looks_alive = sqlx::PgConnection::connect(&db.url).await.expect("connect");
    assert!(store::lock_worker(&mut looks_alive, old).await.expect("lock"));
    let restarted = std::time::Instant::now();
    let (b, worker_b) = started(&db.pool, "same-node").await;
    assert_eq!(finish(&b, run).await, RunStatus::Completed);
    let lease = fast_config("same-node").lease_ttl;
    assert!(
        restarted.elapsed() < lease / 2,
        "resumed after {:?}: it waited for the lease ({lease:?}) instead of seeing its node restart",
        restarted.elapsed()
    );
    worker_b.shutdown().await;
    looks_alive.close().await.expect("close");
}

#[tokio::test]
async fn an_expired_lease_is_taken_over_when_the_owner_cannot_be_seen_to_be_gone() {
    let db = test_db().await;
    let (a, worker_a) = started(&db.pool, "node-a").await;
    let run = trigger(&a, json!({"block": {"b": 1}})).await;
    gate(run).wait_entered().await;
    // Pretend A's session lock is still held by leaving A running (it is stuck in b) but its
    // lease ran out: only expiry lets B in.
    sqlx::query("UPDATE runs SET lease_expires_at = now() - interval '1 second' WHERE id = $1")
        .bind(run)
        .execute(&db.pool)
        .await
        .expect("expire");
    let (b, worker_b) = started(&db.pool, "node-b").await;
    assert_eq!(finish(&b, run).await, RunStatus::Completed);
    gate(run).release();
    worker_b.shutdown().await;
    worker_a.shutdown().await;
    assert_eq!(effects(&db.pool, run).await.iter().filter(|e| e.0 == "b").count(), 1);
}

#[tokio::test]
async fn shutdown_lets_the_attempt_finish_and_hands_the_run_back() {
    let db = test_db().await;
    let (a, worker_a) = started(&db.pool, "node-a").await;
    let run = trigger(&a, json!({"block": {"b": 1}})).await;
    let gate = gate(run);
    gate.wait_entered().await;
    let shutdown = tokio::spawn(worker_a.shutdown());
    tokio::time::sleep(Duration::from_millis(100)).await;
    gate.release(); // the attempt in flight finishes during the grace period
    shutdown.await.expect("shutdown");

    let detail = a.run(run).await.expect("run").expect("exists");
    assert_eq!(detail.run.status, RunStatus::Running);
    assert!(
        detail.run.lease_owner.is_none() && detail.run.ready_at.is_some(),
        "lease given back, due now"
    );
    assert_eq!(detail.steps[1].status, StepStatus::Succeeded);
    assert_eq!(detail.steps[2].attempts, 0, "no attempt spent by the shutdown");
    assert_eq!(log(&a, run).await.last(), Some(&run_level(K::LeaseReleased)));

    let (b, worker_b) = started(&db.pool, "node-b").await;
    assert_eq!(finish(&b, run).await, RunStatus::Completed);
    assert_eq!(effects(&db.pool, run).await.len(), 4);
    worker_b.shutdown().await;
}

#[tokio::test]
async fn a_retry_timer_survives_a_restart() {
    let db = test_db().await;
    // A delay long enough to tell a kept timer from a lost one (a lost timer would leave the
    // run due at once, and the next instance would retry early).
    let delay = Duration::from_secs(2);
    let slow = Workflow::builder("slow-retry", 1)
        .step(
            sagaflow::engine::StepDef::new("a", scripted::Scripted).retry(
                sagaflow::engine::RetryPolicy::attempts(2)
                    .initial_delay(delay)
                    .jitter(0.0),
            ),
        )
        .build()
        .expect("workflow");
    let engine_on = |node: &str| {
        Engine::builder(db.pool.clone())
            .config(fast_config(node))
            .register(slow.clone())
            .build()
            .expect("engine")
    };
    let a = engine_on("node-a");
    let worker_a = a.start_worker().await.expect("worker");
    let run = a
        .trigger("slow-retry", json!({"fail": {"a": 1}}), TriggerOptions::default())
        .await
        .expect("trigger")
        .run_id;
    let due: chrono::DateTime<chrono::Utc> = eventually(WAIT, "the retry to be scheduled", || async {
        let events = engine_events(&a, run).await;
        events
            .iter()
            .find(|e| e.kind == K::RetryScheduled)
            .and_then(|e| serde_json::from_value(e.detail["at"].clone()).ok())
    })
    .await;
    worker_a.shutdown().await;
    let b = engine_on("node-b");
    let worker_b = b.start_worker().await.expect("worker");
    assert_eq!(finish(&b, run).await, RunStatus::Completed);
    // The second attempt started when the durable timer said, not when B came up.
    let events = engine_events(&b, run).await;
    let second = events
        .iter()
        .find(|e| e.kind == K::StepStarted && e.attempt == Some(2))
        .expect("a second attempt");
    assert!(
        second.at >= due - chrono::Duration::milliseconds(50),
        "attempt 2 started at {}, before its retry time {due}",
        second.at
    );
    worker_b.shutdown().await;
}

#[tokio::test]
async fn cancel_stops_after_the_attempt_in_flight_and_compensates() {
    let db = test_db().await;
    let (engine, worker) = started(&db.pool, "n1").await;
    let run = trigger(&engine, json!({"block": {"c": 1}})).await;
    let gate = gate(run);
    gate.wait_entered().await;
    engine.cancel(run, "ops@example.com").await.expect("cancel");
    engine
        .cancel(run, "ops@example.com")
        .await
        .expect("asking twice is fine");
    gate.release();
    assert_eq!(finish(&engine, run).await, RunStatus::Cancelled);
    let entries = log(&engine, run).await;
    assert_eq!(
        entries[6..],
        [
            at(K::StepStarted, "c", 1),
            run_level(K::CancelRequested),
            at(K::StepSucceeded, "c", 1),
            run_level(K::CompensationStarted),
            at(K::StepCompensationStarted, "c", 1),
            at(K::StepCompensationSucceeded, "c", 1),
            at(K::StepCompensationStarted, "b", 1),
            at(K::StepCompensationSucceeded, "b", 1),
            run_level(K::RunCancelled),
        ]
    );
    let events = engine.events(run).await.expect("events").expect("exists");
    assert_eq!(events[7].detail["by"], json!("ops@example.com"));
    match engine.cancel(run, "ops").await {
        Err(EngineError::NotAllowed {
            action: "cancel",
            status: RunStatus::Cancelled,
        }) => {}
        other => panic!("expected a refusal, got {other:?}"),
    }

    // Retrying a cancelled run starts a new, linked run with the same input.
    let Retried::NewRun(new_run) = engine.retry(run, "ops@example.com").await.expect("retry") else {
        panic!("a cancelled run is retried as a new run");
    };
    scripted::gate(new_run).release();
    let old = engine.run(run).await.expect("run").expect("exists").run;
    assert_eq!(old.retried_by, Some(new_run));
    let new = engine.run(new_run).await.expect("run").expect("exists").run;
    assert_eq!(
        (new.retry_of, new.trigger, new.input.clone()),
        (Some(run), sagaflow::engine::Trigger::Retry, old.input)
    );
    match engine.retry(run, "ops").await {
        Err(EngineError::AlreadyRetried { by, .. }) => assert_eq!(by, new_run),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(log(&engine, run).await.last(), Some(&run_level(K::OperatorRetry)));
    worker.shutdown().await;
}

#[tokio::test]
async fn cancelling_a_pending_run_needs_no_compensation() {
    let db = test_db().await;
    let engine = engine(&db.pool, "n1");
    let run = trigger(&engine, json!({})).await;
    engine.cancel(run, "ops").await.expect("cancel");
    let worker = engine.start_worker().await.expect("worker");
    assert_eq!(finish(&engine, run).await, RunStatus::Cancelled);
    assert_eq!(
        log(&engine, run).await,
        [
            run_level(K::RunCreated),
            run_level(K::CancelRequested),
            run_level(K::RunClaimed),
            run_level(K::CompensationStarted),
            run_level(K::RunCancelled),
        ]
    );
    assert!(effects(&db.pool, run).await.is_empty());
    match engine.retry(run, "ops").await {
        Ok(Retried::NewRun(_)) => {}
        other => panic!("a cancelled run can be retried: {other:?}"),
    }
    worker.shutdown().await;
}

#[tokio::test]
async fn operator_actions_refuse_runs_in_the_wrong_status() {
    let db = test_db().await;
    let (engine, worker) = started(&db.pool, "n1").await;
    let run = trigger(&engine, json!({})).await;
    assert_eq!(finish(&engine, run).await, RunStatus::Completed);
    for result in [
        engine.retry(run, "ops").await.map(|_| ()),
        engine.cancel(run, "ops").await,
    ] {
        match result {
            Err(EngineError::NotAllowed {
                status: RunStatus::Completed,
                ..
            }) => {}
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
    let missing = Uuid::now_v7();
    assert!(matches!(engine.cancel(missing, "ops").await, Err(EngineError::RunNotFound(id)) if id == missing));
    assert!(matches!(engine.retry(missing, "ops").await, Err(EngineError::RunNotFound(id)) if id == missing));
    worker.shutdown().await;
}

#[tokio::test]
async fn triggers_are_idempotent_per_key_and_input() {
    let db = test_db().await;
    let engine = engine(&db.pool, "n1");
    let key = TriggerOptions {
        idempotency_key: Some("order-1".into()),
        ..Default::default()
    };
    let first = engine
        .trigger(scripted::NAME, json!({"x": 1}), key.clone())
        .await
        .expect("first");
    let again = engine
        .trigger(scripted::NAME, json!({"x": 1}), key.clone())
        .await
        .expect("replay");
    assert!(first.created && !again.created);
    assert_eq!(first.run_id, again.run_id);
    match engine.trigger(scripted::NAME, json!({"x": 2}), key.clone()).await {
        Err(EngineError::IdempotencyConflict { run, .. }) => assert_eq!(run, first.run_id),
        other => panic!("expected a conflict, got {other:?}"),
    }
    let long = TriggerOptions {
        idempotency_key: Some("k".repeat(256)),
        ..Default::default()
    };
    assert!(matches!(
        engine.trigger(scripted::NAME, json!({}), long).await,
        Err(EngineError::InvalidIdempotencyKey)
    ));
    assert!(matches!(
        engine.trigger("nope", json!({}), TriggerOptions::default()).await,
        Err(EngineError::UnknownWorkflow(_))
    ));
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM runs")
        .fetch_one(&db.pool)
        .await
        .expect("count");
    assert_eq!(count, 1, "refused triggers wrote nothing");

    // Concurrent triggers with one key: one run.
    let mut handles = Vec::new();
    for _ in 0..8 {
        let engine = engine.clone();
        let key = TriggerOptions {
            idempotency_key: Some("order-2".into()),
            ..Default::default()
        };
        handles.push(tokio::spawn(async move {
            engine.trigger(scripted::NAME, json!({"y": 1}), key).await
        }));
    }
    let mut ids = Vec::new();
    for h in handles {
        ids.push(h.await.expect("join").expect("trigger").run_id);
    }
    ids.dedup();
    assert_eq!(ids.len(), 1);
}

#[tokio::test]
async fn the_log_is_append_only() {
    let db = test_db().await;
    let engine = engine(&db.pool, "n1");
    let run = trigger(&engine, json!({})).await;
    let rewrite = sqlx::query("UPDATE run_events SET kind = 'run_completed' WHERE run_id = $1")
        .bind(run)
        .execute(&db.pool)
        .await;
    assert!(rewrite.is_err_and(|e| e.to_string().contains("append-only")));
}

#[tokio::test]
async fn many_runs_complete_under_concurrency() {
    let db = test_db().await;
    let (a, worker_a) = started(&db.pool, "node-a").await;
    let (b, worker_b) = started(&db.pool, "node-b").await;
    let mut runs = Vec::new();
    for i in 0..60 {
        let engine = if i % 2 == 0 { &a } else { &b };
        let input = if i % 5 == 0 {
            json!({"fail": {"c": 1}})
        } else {
            json!({"i": i})
        };
        runs.push(trigger(engine, input).await);
    }
    for run in &runs {
        assert_eq!(finish(&a, *run).await, RunStatus::Completed);
    }
    let per_step: Vec<(i64,)> =
        sqlx::query_as("SELECT count(*) FROM test_effects GROUP BY run_id, step HAVING count(*) <> 1")
            .fetch_all(&db.pool)
            .await
            .expect("effects");
    assert!(per_step.is_empty(), "some step's effect happened twice");
    worker_a.shutdown().await;
    worker_b.shutdown().await;
}

#[tokio::test]
async fn a_notification_wakes_an_idle_worker_without_polling() {
    let db = test_db().await;
    let worker_engine = Engine::builder(db.pool.clone())
        .config(sagaflow::engine::EngineConfig {
            poll_interval: Duration::from_secs(600),
            ..fast_config("worker")
        })
        .register(scripted::workflow())
        .build()
        .expect("engine");
    let worker = worker_engine.start_worker().await.expect("worker");
    tokio::time::sleep(Duration::from_millis(300)).await; // idle, asleep for the poll interval
    let api_only = engine(&db.pool, "api"); // no worker: its runs are left for others
    let started = std::time::Instant::now();
    let run = trigger(&api_only, json!({})).await;
    assert_eq!(
        api_only
            .wait_for_terminal(run, Duration::from_secs(5))
            .await
            .expect("wait"),
        RunStatus::Completed
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    let claimed_by = &engine_events(&api_only, run).await[1].detail["by"];
    assert!(
        claimed_by.as_str().is_some_and(|b| b.starts_with("worker#")),
        "{claimed_by}"
    );
    worker.shutdown().await;
}

async fn engine_events(engine: &Engine, run: Uuid) -> Vec<sagaflow::engine::EventRow> {
    engine.events(run).await.expect("events").expect("exists")
}

#[tokio::test]
async fn heartbeats_keep_the_lease_of_an_attempt_longer_than_the_lease() {
    let db = test_db().await;
    let short_lease = sagaflow::engine::EngineConfig {
        lease_ttl: Duration::from_millis(600),
        ..fast_config("a")
    };
    let a = Engine::builder(db.pool.clone())
        .config(short_lease.clone())
        .register(scripted::workflow())
        .build()
        .expect("a");
    let worker_a = a.start_worker().await.expect("worker a");
    let b = Engine::builder(db.pool.clone())
        .config(sagaflow::engine::EngineConfig {
            node_id: "b".into(),
            ..short_lease
        })
        .register(scripted::workflow())
        .build()
        .expect("b");
    let worker_b = b.start_worker().await.expect("worker b");
    // b's attempt takes 2 s: more than three leases.
    let run = trigger(&a, json!({"sleep_ms": {"b": 2000}, "sleep_attempts": {"b": 1}})).await;
    assert_eq!(finish(&a, run).await, RunStatus::Completed);
    let entries = log(&a, run).await;
    assert!(!entries.iter().any(|e| e.0 == K::LeaseTakenOver), "{entries:?}");
    assert_eq!(effects(&db.pool, run).await.len(), 4);
    worker_b.shutdown().await;
    worker_a.shutdown().await;
}

#[tokio::test]
async fn run_changes_are_announced_for_live_views() {
    let db = test_db().await;
    let mut listener = sqlx::postgres::PgListener::connect_with(&db.pool)
        .await
        .expect("listener");
    listener
        .listen(sagaflow::engine::changes::CHANNEL)
        .await
        .expect("listen");
    let (engine, worker) = started(&db.pool, "n1").await;
    let run = trigger(&engine, json!({})).await;
    assert_eq!(finish(&engine, run).await, RunStatus::Completed);
    let mut mentioned = false;
    while let Ok(Ok(notification)) = tokio::time::timeout(Duration::from_secs(2), listener.recv()).await {
        if notification.payload() == "*" || notification.payload().split(',').any(|id| id == run.to_string()) {
            mentioned = true;
            break;
        }
    }
    assert!(mentioned, "no notification named run {run}");
    worker.shutdown().await;
}

#[tokio::test]
async fn a_lease_without_an_executor_expires_even_while_its_worker_lives() {
    // A claim (or a trigger) whose commit succeeded while its acknowledgement was lost leaves
    // a run leased to a live worker with nobody driving it: its lease must not be renewed.
    let db = test_db().await;
    // The live worker knows only another workflow, so it never claims the run itself.
    let other = Workflow::builder("other", 1)
        .step(sagaflow::engine::StepDef::hook("noop"))
        .build()
        .expect("workflow");
    let config = sagaflow::engine::EngineConfig {
        lease_ttl: Duration::from_millis(600),
        ..fast_config("live")
    };
    let live = Engine::builder(db.pool.clone())
        .config(config)
        .register(other)
        .build()
        .expect("engine");
    let live_worker = live.start_worker().await.expect("worker");
    let api_only = engine(&db.pool, "api");
    let run = trigger(&api_only, json!({})).await;
    let mut tx = db.pool.begin().await.expect("tx");
    let claimed = store::claim(
        &mut tx,
        live_worker.id(),
        1,
        600,
        &["scripted@1".to_string()],
        chrono::Utc::now(),
    )
    .await
    .expect("claim");
    tx.commit().await.expect("commit");
    assert_eq!(claimed.len(), 1);

    // Several heartbeats later, the lease has run out and recovery made the run claimable.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (ready, expired): (bool, bool) =
        sqlx::query_as("SELECT ready_at IS NOT NULL, lease_expires_at < now() FROM runs WHERE id = $1")
            .bind(run)
            .fetch_one(&db.pool)
            .await
            .expect("run");
    assert!(
        ready && expired,
        "the orphaned lease was kept alive (ready {ready}, expired {expired})"
    );

    let (b, worker_b) = started(&db.pool, "rescuer").await;
    assert_eq!(finish(&b, run).await, RunStatus::Completed);
    assert!(log(&b, run).await.contains(&run_level(K::LeaseTakenOver)));
    worker_b.shutdown().await;
    live_worker.shutdown().await;
}

/// Records every call of the workflow's finish hook as an effect (`finish`, the status), in
/// the hook's transaction: a call that did not commit leaves no row.
struct CountingFinish;

#[async_trait::async_trait]
impl sagaflow::engine::FinishHook for CountingFinish {
    async fn on_finish(&self, db: &mut sqlx::PgConnection, run_id: Uuid, status: RunStatus) -> Result<(), StepError> {
        sqlx::query("INSERT INTO test_effects (run_id, step, phase, attempt) VALUES ($1, 'finish', $2, 0)")
            .bind(run_id)
            .bind(status.as_str())
            .execute(db)
            .await?;
        Ok(())
    }
}

const HOOKED: &str = "hooked";
const ALL_SKIPPED: &str = "all-skipped";

/// The scripted steps `a` and `b`, plus a finish hook; and a plan whose every step `when`
/// skips, with the same hook.
fn hooked_engine(pool: &PgPool, node: &str) -> Engine {
    let hooked = Workflow::builder(HOOKED, 1)
        .step(sagaflow::engine::StepDef::new("a", scripted::Scripted).retry(scripted::fast_retry(3)))
        .step(
            sagaflow::engine::StepDef::compensable("b", scripted::Scripted)
                .retry(scripted::fast_retry(3))
                .compensation_retry(scripted::fast_retry(3)),
        )
        .on_finish(CountingFinish)
        .build()
        .expect("workflow");
    let skipped = Workflow::builder(ALL_SKIPPED, 1)
        .step(sagaflow::engine::StepDef::new("a", scripted::Scripted).when(|_| false))
        .step(sagaflow::engine::StepDef::new("b", scripted::Scripted).when(|_| false))
        .on_finish(CountingFinish)
        .build()
        .expect("a plan whose every step can be skipped is legal");
    Engine::builder(pool.clone())
        .config(fast_config(node))
        .register(hooked)
        .register(skipped)
        .build()
        .expect("engine")
}

async fn finish_calls(pool: &PgPool, run: Uuid) -> Vec<String> {
    sqlx::query_scalar("SELECT phase FROM test_effects WHERE run_id = $1 AND step = 'finish' ORDER BY at")
        .bind(run)
        .fetch_all(pool)
        .await
        .expect("finish calls")
}

#[tokio::test]
async fn the_finish_hook_runs_once_on_every_path_to_a_terminal_status() {
    let db = test_db().await;
    let engine = hooked_engine(&db.pool, "n1");
    let start = |workflow: &'static str, input: Value| {
        let engine = engine.clone();
        async move {
            engine
                .trigger(workflow, input, TriggerOptions::default())
                .await
                .expect("trigger")
                .run_id
        }
    };
    // Runs that end while being claimed, before any worker drives them:
    // an operator cancelled it while pending,
    let cancelled = start(HOOKED, json!({})).await;
    engine.cancel(cancelled, "ops").await.expect("cancel");
    // its attempts were lost with their workers once too often (a step crashing every
    // worker) and there is nothing to undo,
    let crashing = start(HOOKED, json!({})).await;
    sqlx::query(
        "UPDATE run_steps SET status = 'running', attempts = 6, lost_attempts = 5 WHERE run_id = $1 AND idx = 0",
    )
    .bind(crashing)
    .execute(&db.pool)
    .await
    .expect("a step crashing its workers");
    sqlx::query("UPDATE runs SET status = 'running' WHERE id = $1")
        .bind(crashing)
        .execute(&db.pool)
        .await
        .expect("running");
    // and every step of its plan is skipped.
    let skipped_at_claim = start(ALL_SKIPPED, json!({})).await;
    let worker = engine.start_worker().await.expect("worker");
    // Runs the worker drives: completed, compensated, and all skipped with a free local slot
    // (at 2b67f91 a CHECK violation: inserted completed and leased).
    let completed = start(HOOKED, json!({})).await;
    let compensated = start(HOOKED, json!({"permanent": {"b": true}})).await;
    let skipped_locally = start(ALL_SKIPPED, json!({})).await;

    for (run, status) in [
        (cancelled, RunStatus::Cancelled),
        (crashing, RunStatus::Compensated),
        (skipped_at_claim, RunStatus::Completed),
        (completed, RunStatus::Completed),
        (compensated, RunStatus::Compensated),
        (skipped_locally, RunStatus::Completed),
    ] {
        assert_eq!(finish(&engine, run).await, status, "run {run}");
        assert_eq!(finish_calls(&db.pool, run).await, [status.as_str()], "run {run}");
    }
    assert_eq!(
        log(&engine, skipped_locally).await,
        [
            run_level(K::RunCreated),
            run_level(K::RunClaimed),
            ev(K::StepSkipped, Some("a"), None),
            ev(K::StepSkipped, Some("b"), None),
            run_level(K::RunCompleted),
        ]
    );
    assert_eq!(
        step_statuses(&engine, skipped_locally).await,
        [StepStatus::Skipped, StepStatus::Skipped]
    );
    worker.shutdown().await;
}

/// A finish hook that refuses some final statuses, permanently, and records the others.
struct Refusing(&'static [RunStatus]);

#[async_trait::async_trait]
impl sagaflow::engine::FinishHook for Refusing {
    async fn on_finish(&self, db: &mut sqlx::PgConnection, run_id: Uuid, status: RunStatus) -> Result<(), StepError> {
        if self.0.contains(&status) {
            return Err(StepError::permanent(format!("no {status} here")));
        }
        CountingFinish.on_finish(db, run_id, status).await
    }
}

fn refusing_engine(pool: &PgPool, refuse: &'static [RunStatus]) -> Engine {
    let workflow = Workflow::builder("picky", 1)
        .step(sagaflow::engine::StepDef::new("a", scripted::Scripted).retry(scripted::fast_retry(3)))
        .step(sagaflow::engine::StepDef::new("b", scripted::Scripted).retry(scripted::fast_retry(3)))
        .on_finish(Refusing(refuse))
        .build()
        .expect("workflow");
    Engine::builder(pool.clone())
        .config(fast_config("n1"))
        .register(workflow)
        .build()
        .expect("engine")
}

#[tokio::test]
async fn a_finish_hook_that_refuses_is_an_outcome_of_the_run_not_a_lost_attempt() {
    let db = test_db().await;
    // The hook refuses `completed`: the last step's outcome becomes a failed attempt (its
    // writes rolled back, not re-run as lost), and the run compensates.
    let engine = refusing_engine(&db.pool, &[RunStatus::Completed]);
    let worker = engine.start_worker().await.expect("worker");
    let run = engine
        .trigger("picky", json!({}), TriggerOptions::default())
        .await
        .expect("trigger")
        .run_id;
    assert_eq!(finish(&engine, run).await, RunStatus::Compensated);
    assert_eq!(
        log(&engine, run).await,
        [
            run_level(K::RunCreated),
            run_level(K::RunClaimed),
            at(K::StepStarted, "a", 1),
            at(K::StepSucceeded, "a", 1),
            at(K::StepStarted, "b", 1),
            at(K::StepFailed, "b", 1),
            run_level(K::CompensationStarted),
            run_level(K::RunCompensated),
        ]
    );
    assert_eq!(
        effects(&db.pool, run).await,
        [effect("a", "invoke", 1), effect("finish", "compensated", 0)],
        "b's writes rolled back with the refused end"
    );
    assert_eq!(finish_calls(&db.pool, run).await, ["compensated"]);
    let detail = engine.run(run).await.expect("run").expect("exists");
    let error = detail.run.error.expect("error");
    assert!(
        error["message"]
            .as_str()
            .is_some_and(|m| m.contains("finish hook refused")),
        "{error}"
    );
    worker.shutdown().await;

    // A hook that refuses every end: the run ends `failed` (needs an operator), with the
    // hook's message, and the hook is not asked a third time.
    let db = test_db().await;
    let engine = refusing_engine(&db.pool, &RunStatus::ALL);
    // One run ends at its claim (cancelled while pending), one in the executor.
    let at_claim = engine
        .trigger("picky", json!({}), TriggerOptions::default())
        .await
        .expect("trigger")
        .run_id;
    engine.cancel(at_claim, "ops").await.expect("cancel");
    let worker = engine.start_worker().await.expect("worker");
    let driven = engine
        .trigger("picky", json!({}), TriggerOptions::default())
        .await
        .expect("trigger")
        .run_id;
    for run in [at_claim, driven] {
        assert_eq!(finish(&engine, run).await, RunStatus::Failed, "run {run}");
        assert!(finish_calls(&db.pool, run).await.is_empty());
        let events = log(&engine, run).await;
        assert_eq!(events.last(), Some(&run_level(K::RunFailed)), "{events:?}");
        assert!(
            !events
                .iter()
                .any(|e| matches!(e.0, K::RunCompleted | K::RunCompensated | K::RunCancelled)),
            "{events:?}"
        );
        let detail = engine.run(run).await.expect("run").expect("exists");
        let message = detail.run.error.expect("error")["message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(
            message.contains("finish hook refused the run's final status"),
            "{message}"
        );
        assert!(
            detail.steps.iter().all(|s| s.attempts <= 1),
            "no step re-run as if its attempt were lost: {:?}",
            detail.steps
        );
    }
    worker.shutdown().await;
}

#[tokio::test]
async fn a_run_whose_steps_do_not_match_its_plan_is_parked_not_claimed_forever() {
    let db = test_db().await;
    let engine = engine(&db.pool, "n1");
    let run = trigger(&engine, json!({})).await;
    // Its recorded steps no longer match the plan of its version (edited in place).
    sqlx::query("UPDATE run_steps SET name = 'renamed' WHERE run_id = $1 AND idx = 3")
        .bind(run)
        .execute(&db.pool)
        .await
        .expect("tamper");
    let parked_entries = |engine: Engine| async move {
        log(&engine, run)
            .await
            .into_iter()
            .filter(|e| e.0 == K::RunParked)
            .count()
    };
    let worker = engine.start_worker().await.expect("worker");
    let row = eventually(WAIT, "the run to be parked", || async {
        let detail = engine.run(run).await.expect("run").expect("exists");
        detail.run.parked_reason.is_some().then_some(detail.run)
    })
    .await;
    let reason = row.parked_reason.clone().unwrap_or_default();
    assert!(reason.contains("renamed") && reason.contains("scripted@1"), "{reason}");
    assert_eq!(
        (row.lease_owner, row.ready_at, row.status),
        (None, None, RunStatus::Pending)
    );
    // Not claimed again every lease period: still parked, logged once, after several
    // recovery passes and longer than a lease.
    tokio::time::sleep(fast_config("n1").lease_ttl + Duration::from_millis(500)).await;
    assert_eq!(parked_entries(engine.clone()).await, 1);
    assert!(
        engine
            .run(run)
            .await
            .expect("run")
            .expect("exists")
            .run
            .parked_reason
            .is_some()
    );
    worker.shutdown().await;

    // An instance starting with the plan it needs (the rows repaired here) makes it due, and
    // it completes.
    sqlx::query("UPDATE run_steps SET name = 'd' WHERE run_id = $1 AND idx = 3")
        .bind(run)
        .execute(&db.pool)
        .await
        .expect("repair");
    let (engine, worker) = started(&db.pool, "n2").await;
    assert_eq!(finish(&engine, run).await, RunStatus::Completed);
    assert_eq!(parked_entries(engine.clone()).await, 1);
    assert_eq!(
        engine.run(run).await.expect("run").expect("exists").run.parked_reason,
        None
    );
    worker.shutdown().await;
}

#[tokio::test]
async fn a_changed_plan_under_a_stored_version_is_refused() {
    let db = test_db().await;
    let (_, worker) = started(&db.pool, "n1").await;
    worker.shutdown().await;
    // The same name and version with a step removed.
    let changed = Workflow::builder(scripted::NAME, 1)
        .step(sagaflow::engine::StepDef::new("a", scripted::Scripted))
        .step(sagaflow::engine::StepDef::new("c", scripted::Scripted))
        .build()
        .expect("workflow");
    let engine = Engine::builder(db.pool.clone())
        .config(fast_config("n2"))
        .register(changed)
        .build()
        .expect("engine");
    for refused in [engine.record_plans().await, engine.start_worker().await.map(|_| ())] {
        match refused {
            Err(EngineError::PlanChanged {
                workflow,
                version,
                stored,
                registered,
            }) => {
                assert_eq!((workflow.as_str(), version), (scripted::NAME, 1));
                assert_eq!(stored, ["a", "b", "c", "d"]);
                assert_eq!(registered, ["a", "c"]);
            }
            other => panic!("a changed plan was accepted: {other:?}"),
        }
    }
    let plans: i64 = sqlx::query_scalar("SELECT count(*) FROM workflow_plans")
        .fetch_one(&db.pool)
        .await
        .expect("plans");
    assert_eq!(plans, 1, "the stored plan is kept");
    // Registered as version 2, it is accepted beside version 1.
    let v2 = Workflow::builder(scripted::NAME, 2)
        .step(sagaflow::engine::StepDef::new("a", scripted::Scripted))
        .build()
        .expect("workflow");
    let engine = Engine::builder(db.pool.clone())
        .config(fast_config("n3"))
        .register(scripted::workflow())
        .register(v2)
        .build()
        .expect("engine");
    engine.record_plans().await.expect("a new version is a new plan");
}

/// Each enum's names, three ways: `as_str`, serde, and the PostgreSQL enum it is stored as;
/// and the PostgreSQL enum has no label the Rust enum lacks.
async fn names_agree<T>(pool: &PgPool, sql_type: &str, all: &[T], as_str: impl Fn(&T) -> &'static str)
where
    T: serde::Serialize
        + Copy
        + std::fmt::Debug
        + for<'q> sqlx::Encode<'q, sqlx::Postgres>
        + sqlx::Type<sqlx::Postgres>,
{
    for value in all {
        let stored: String = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT $1::{sql_type}::text")))
            .bind(*value)
            .fetch_one(pool)
            .await
            .expect("cast");
        assert_eq!(stored, as_str(value), "{value:?} in PostgreSQL");
        assert_eq!(
            serde_json::to_value(value).expect("serde"),
            json!(as_str(value)),
            "{value:?} in JSON"
        );
    }
    let labels: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT unnest(enum_range(NULL::{sql_type}))::text"
    )))
    .fetch_all(pool)
    .await
    .expect("labels");
    let ours: Vec<&str> = all.iter().map(&as_str).collect();
    assert_eq!(labels, ours, "{sql_type}: the Rust list and the database enum differ");
}

#[tokio::test]
async fn every_status_name_is_the_same_in_rust_json_and_postgres() {
    let db = test_db().await;
    names_agree(&db.pool, "run_status", &RunStatus::ALL, |s| s.as_str()).await;
    names_agree(&db.pool, "step_status", &StepStatus::ALL, |s| s.as_str()).await;
    names_agree(&db.pool, "event_kind", &K::ALL, |s| s.as_str()).await;
    names_agree(&db.pool, "run_trigger", &sagaflow::engine::Trigger::ALL, |s| s.as_str()).await;
    names_agree(&db.pool, "outbox_status", &sagaflow::domain::OutboxStatus::ALL, |s| {
        s.as_str()
    })
    .await;
    for status in RunStatus::ALL {
        let terminal: bool = sqlx::query_scalar("SELECT run_status_is_terminal($1)")
            .bind(status)
            .fetch_one(&db.pool)
            .await
            .expect("run_status_is_terminal");
        assert_eq!(
            terminal,
            status.is_terminal(),
            "{status}: Rust and SQL disagree on terminal"
        );
        let unfinished: bool = sqlx::query_scalar("SELECT run_status_is_unfinished($1)")
            .bind(status)
            .fetch_one(&db.pool)
            .await
            .expect("run_status_is_unfinished");
        assert_eq!(
            unfinished,
            !status.is_terminal(),
            "{status}: unfinished is not the complement of terminal"
        );
    }
}

/// The runs' reachability CHECK and the finish webhook's trigger name the terminal statuses
/// themselves (a function call there is inlined again at every write: migration 0017); both
/// lists are Rust's, so a status added to one and not the other fails here.
#[tokio::test]
async fn the_check_and_the_trigger_that_name_terminal_statuses_name_rusts() {
    let db = test_db().await;
    let terminal: Vec<String> = RunStatus::ALL
        .iter()
        .filter(|s| s.is_terminal())
        .map(|s| format!("'{}'::run_status", s.as_str()))
        .collect();
    let list = format!("ARRAY[{}]", terminal.join(", "));
    let (check, trigger, on_insert): (String, String, String) = sqlx::query_as(
        "SELECT (SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = 'runs_reachable'),
                (SELECT pg_get_triggerdef(oid) FROM pg_trigger WHERE tgname = 'runs_webhook_on_finish'),
                (SELECT pg_get_triggerdef(oid) FROM pg_trigger WHERE tgname = 'runs_webhook_on_insert_finished')",
    )
    .fetch_one(&db.pool)
    .await
    .expect("the constraint and the triggers");
    assert!(check.contains(&format!("status = ANY ({list})")), "{check}");
    assert!(!check.contains("run_status_is_terminal"), "{check}");
    assert!(trigger.contains(&format!("new.status = ANY ({list})")), "{trigger}");
    assert!(trigger.contains(&format!("old.status <> ALL ({list})")), "{trigger}");
    assert!(on_insert.contains("BEFORE INSERT"), "{on_insert}");
    assert!(on_insert.contains(&format!("new.status = ANY ({list})")), "{on_insert}");
}

/// Fused or not, a run of local steps records the same thing: the same final status, log
/// (every attempt and outcome, in order) and effects, through retries with backoff, a
/// permanent failure with partial work, a compensation that fails once, and a skipped step.
/// A failed attempt inside a segment rolls the segment back and is then recorded alone, so
/// nothing of the rolled-back attempts shows, and no effect is doubled. A trigger that waits
/// leaves the run's insert to its first segment: the same again, the clean run written in a
/// single transaction, insert included, and its first entries at the time it was accepted;
/// and so again without lanes, where that segment commits on its own.
#[tokio::test]
async fn fused_segments_record_exactly_what_one_commit_per_attempt_records() {
    let inputs = [
        json!({}),
        json!({"fail": {"b": 2}}),
        json!({"permanent": {"c": true}, "partial": {"c": true}}),
        json!({"fail": {"d": 1}, "comp_fail": {"b": 1}}),
        json!({"skip": ["d"]}),
    ];
    let mut recorded = Vec::new();
    // (fused, the trigger waits: the first segment inserts the run, lanes)
    for (fused, waits, lanes) in [(true, true, 2), (true, false, 2), (false, false, 2), (true, true, 0)] {
        let db = test_db().await;
        let engine = Engine::builder(db.pool.clone())
            .config(sagaflow::engine::EngineConfig {
                fuse_local_steps: fused,
                commit_lanes: lanes,
                // Room beyond a claim's batch, so a trigger always finds a free slot and
                // starts its run on this worker (where a waiting trigger's first segment
                // inserts it), however a claim is timed.
                max_concurrent_runs: 64,
                ..fast_config("differential")
            })
            .register(scripted::local_workflow())
            .build()
            .expect("engine");
        let worker = engine.start_worker().await.expect("worker");
        let mut runs = Vec::new();
        for (i, input) in inputs.iter().enumerate() {
            let run = if waits {
                let waited = engine
                    .trigger_and_wait(
                        scripted::LOCAL_NAME,
                        input.clone(),
                        TriggerOptions::default(),
                        Duration::from_secs(10),
                    )
                    .await
                    .expect("trigger");
                assert!(waited.triggered.created);
                waited.triggered.run_id
            } else {
                engine
                    .trigger(scripted::LOCAL_NAME, input.clone(), TriggerOptions::default())
                    .await
                    .expect("trigger")
                    .run_id
            };
            let status = finish(&engine, run).await;
            if i == 0 && waits {
                // The run, its steps and every entry went in with one commit, and the
                // entries of its creation carry the time it was accepted, before its steps'.
                let (transactions, created_first): (i64, bool) = sqlx::query_as(
                    "SELECT (SELECT count(DISTINCT x) FROM (
                                 SELECT xmin::text AS x FROM runs WHERE id = $1
                                 UNION ALL SELECT xmin::text FROM run_steps WHERE run_id = $1
                                 UNION ALL SELECT xmin::text FROM run_events WHERE run_id = $1) w),
                            (SELECT bool_and(e.at = r.created_at) FROM run_events e, runs r
                              WHERE e.run_id = $1 AND r.id = $1 AND e.seq <= 3)
                            AND (SELECT min(s.started_at) >= r.created_at FROM run_steps s, runs r
                                  WHERE s.run_id = $1 AND r.id = $1 GROUP BY r.created_at)",
                )
                .bind(run)
                .fetch_one(&db.pool)
                .await
                .expect("transactions");
                assert_eq!(transactions, 1, "the clean run took {transactions} transactions");
                assert!(created_first, "the run's first entries are at its acceptance");
            }
            if i == 0 && !waits {
                // The clean run: one segment wrote everything after the first step's start.
                let commits: i64 = sqlx::query_scalar(
                    "SELECT count(DISTINCT xmin::text) FROM run_events WHERE run_id = $1 AND seq > 3",
                )
                .bind(run)
                .fetch_one(&db.pool)
                .await
                .expect("commits");
                assert_eq!(
                    commits == 1,
                    fused,
                    "{commits} transactions wrote the clean run (fused: {fused})"
                );
            }
            let mut done = effects(&db.pool, run).await;
            // A segment's effects share their transaction's time: order them by what they are.
            done.sort();
            runs.push((input.clone(), status, log(&engine, run).await, done));
        }
        worker.shutdown().await;
        recorded.push(runs);
    }
    for (((inserted_with_segment, fused), per_attempt), unbatched) in
        recorded[0].iter().zip(&recorded[1]).zip(&recorded[2]).zip(&recorded[3])
    {
        assert_eq!(fused, per_attempt, "fused, then per attempt, for input {}", fused.0);
        assert_eq!(
            inserted_with_segment, per_attempt,
            "inserted with its first segment, then per attempt, for input {}",
            fused.0
        );
        assert_eq!(
            unbatched, per_attempt,
            "inserted with its first segment committed alone, then per attempt, for input {}",
            fused.0
        );
    }
}

/// Operator repair (DESIGN.md §11): a compensation that gave up is resolved by hand with a
/// note, and the unwind finishes; every refusal changes nothing.
#[tokio::test]
async fn a_compensation_resolved_by_hand_lets_the_unwind_finish_compensated() {
    let db = test_db().await;
    let (engine, worker) = started(&db.pool, "n1").await;
    // d fails for good; undoing c is impossible: the run ends failed with b still done.
    let run = trigger(
        &engine,
        json!({"permanent": {"d": true}, "comp_permanent": {"c": true}}),
    )
    .await;
    assert_eq!(finish(&engine, run).await, RunStatus::Failed);
    let before = log(&engine, run).await.len();

    let refused = [
        (engine.resolve_by_hand(run, "c", "ops", "   ").await, "a blank note"),
        (engine.resolve_by_hand(run, "b", "ops", "done").await, "b never gave up"),
        (engine.resolve_by_hand(run, "zz", "ops", "done").await, "no such step"),
        (
            engine.resolve_by_hand(Uuid::now_v7(), "c", "ops", "done").await,
            "no such run",
        ),
    ];
    assert!(
        matches!(refused[0].0, Err(EngineError::InvalidNote)),
        "{:?}",
        refused[0]
    );
    assert!(
        matches!(refused[1].0, Err(EngineError::NothingToResolve { .. })),
        "{:?}",
        refused[1]
    );
    assert!(
        matches!(refused[2].0, Err(EngineError::StepNotFound { .. })),
        "{:?}",
        refused[2]
    );
    assert!(
        matches!(refused[3].0, Err(EngineError::RunNotFound(_))),
        "{:?}",
        refused[3]
    );
    assert_eq!(log(&engine, run).await.len(), before, "a refusal writes nothing");

    engine
        .resolve_by_hand(
            run,
            "c",
            "ops@example.com",
            "refunded in the payment provider's console",
        )
        .await
        .expect("resolve");
    assert_eq!(finish(&engine, run).await, RunStatus::Compensated);
    let detail = engine.run(run).await.expect("run").expect("exists");
    assert_eq!(
        detail.steps.iter().map(|s| s.status).collect::<Vec<_>>(),
        [
            StepStatus::Succeeded,
            StepStatus::Compensated,
            StepStatus::Compensated,
            StepStatus::Failed
        ]
    );
    assert_eq!(
        detail.run.run_error().and_then(|e| e.step).as_deref(),
        Some("d"),
        "the run keeps its original error"
    );
    let events = engine.events(run).await.expect("events").expect("run");
    let resolved = events
        .iter()
        .find(|e| e.kind == K::StepResolvedByHand)
        .expect("the resolution is in the log");
    assert_eq!(resolved.step.as_deref(), Some("c"));
    assert_eq!(resolved.detail["by"], "ops@example.com");
    assert_eq!(resolved.detail["note"], "refunded in the payment provider's console");
    let tail: Vec<_> = log(&engine, run).await[before..].to_vec();
    assert_eq!(
        tail,
        [
            at(K::StepResolvedByHand, "c", 1),
            run_level(K::RunClaimed),
            at(K::StepCompensationStarted, "b", 1),
            at(K::StepCompensationSucceeded, "b", 1),
            run_level(K::RunCompensated),
        ]
    );
    // Once compensated there is nothing left to resolve.
    let again = engine.resolve_by_hand(run, "c", "ops", "again").await;
    assert!(matches!(again, Err(EngineError::NotAllowed { .. })), "{again:?}");
    worker.shutdown().await;
}

/// A restart from a step reuses the recorded outputs of the steps before it (their work is
/// not done again) and is refused when one of them was compensated.
#[tokio::test]
async fn a_restart_from_a_step_reuses_the_outputs_before_it_and_refuses_what_was_undone() {
    let db = test_db().await;
    let (engine, worker) = started(&db.pool, "n1").await;
    // Failed: a and b succeeded and were not undone (undoing c gave up first).
    let failed = trigger(
        &engine,
        json!({"permanent": {"d": true}, "comp_permanent": {"c": true}}),
    )
    .await;
    assert_eq!(finish(&engine, failed).await, RunStatus::Failed);
    let old = engine.run(failed).await.expect("run").expect("exists");

    let bad = engine.restart(failed, "nope", None, "ops", None).await;
    assert!(matches!(bad, Err(EngineError::StepNotFound { .. })), "{bad:?}");
    let bad_note = engine.restart(failed, "c", None, "ops", Some(&"x".repeat(3000))).await;
    assert!(matches!(bad_note, Err(EngineError::InvalidNote)), "{bad_note:?}");
    let from_d = engine.restart(failed, "d", None, "ops", None).await;
    assert!(
        matches!(from_d, Err(EngineError::CannotRestartFrom { ref why, .. }) if why.contains("`c` was compensated")),
        "{from_d:?}"
    );

    let fixed = json!({"subject": "fixed"});
    let new = engine
        .restart(failed, "c", Some(fixed.clone()), "ops", Some("d's service is back"))
        .await
        .expect("restart");
    assert_eq!(finish(&engine, new).await, RunStatus::Completed);
    let restarted = engine.run(new).await.expect("run").expect("exists");
    assert_eq!(
        (restarted.run.retry_of, restarted.run.input.clone()),
        (Some(failed), fixed.clone())
    );
    assert_eq!(
        engine.run(failed).await.expect("run").expect("exists").run.retried_by,
        Some(new)
    );
    assert_eq!(restarted.steps[0].output, old.steps[0].output, "a's output is reused");
    assert_eq!(restarted.steps[1].output, old.steps[1].output, "b's output is reused");
    assert_eq!(restarted.run.workflow_version, old.run.workflow_version);
    // a and b did no work in the new run; c and d did.
    let new_effects: Vec<String> = effects(&db.pool, new).await.into_iter().map(|(s, _, _)| s).collect();
    assert_eq!(new_effects, ["c", "d"]);
    let events = engine.events(new).await.expect("events").expect("run");
    assert_eq!(events[0].detail["restart_of"], json!(failed));
    assert_eq!(events[0].detail["from_step"], "c");
    assert_eq!(events[0].detail["input_changed"], true);
    assert_eq!(events[0].detail["previous_input"], old.run.input);
    assert_eq!(events[0].detail["note"], "d's service is back");
    assert_eq!(
        log(&engine, new).await[..4],
        [
            run_level(K::RunCreated),
            ev(K::StepSucceeded, Some("a"), None),
            ev(K::StepSucceeded, Some("b"), None),
            run_level(K::RunClaimed),
        ]
    );
    assert_eq!(events[1].detail["reused_from"], json!(failed));
    let linked = engine.events(failed).await.expect("events").expect("run");
    let restart = linked.last().expect("entry");
    assert_eq!(
        (restart.kind, restart.detail["new_run"].clone()),
        (K::OperatorRestart, json!(new))
    );
    let twice = engine.restart(failed, "c", None, "ops", None).await;
    assert!(matches!(twice, Err(EngineError::AlreadyRetried { .. })), "{twice:?}");
    let completed = engine.restart(new, "c", None, "ops", None).await;
    assert!(
        matches!(completed, Err(EngineError::NotAllowed { .. })),
        "{completed:?}"
    );

    // Compensated: b was undone, so a restart must start at b; a's output is still reused.
    let compensated = trigger(&engine, json!({"permanent": {"d": true}})).await;
    assert_eq!(finish(&engine, compensated).await, RunStatus::Compensated);
    let from_c = engine.restart(compensated, "c", None, "ops", None).await;
    assert!(
        matches!(from_c, Err(EngineError::CannotRestartFrom { ref why, .. }) if why.contains("`b` was compensated")),
        "{from_c:?}"
    );
    let again = engine
        .restart(compensated, "b", Some(json!({})), "ops", None)
        .await
        .expect("restart");
    assert_eq!(finish(&engine, again).await, RunStatus::Completed);
    let effects_again: Vec<String> = effects(&db.pool, again).await.into_iter().map(|(s, _, _)| s).collect();
    assert_eq!(effects_again, ["b", "c", "d"]);
    worker.shutdown().await;
}

async fn run_row(engine: &Engine, run: Uuid) -> sagaflow::engine::RunRow {
    engine.run(run).await.expect("run").expect("exists").run
}

async fn assert_no_violations(pool: &PgPool, engine: &Engine) {
    let violations = sagaflow::check::violations(pool, engine).await.expect("check");
    assert!(violations.is_empty(), "{violations:?}");
}

#[tokio::test]
async fn a_pause_stops_after_the_attempt_in_flight_holds_no_lease_and_a_resume_finishes_the_run() {
    let db = test_db().await;
    let (engine, worker) = started(&db.pool, "n1").await;
    let run = trigger(&engine, json!({"block": {"c": 1}})).await;
    let gate = gate(run);
    gate.wait_entered().await;
    engine.pause(run, "ops@example.com").await.expect("pause");
    engine
        .pause(run, "ops@example.com")
        .await
        .expect("asking twice is fine");
    let asked = run_row(&engine, run).await;
    assert_eq!((asked.status, asked.pause_requested), (RunStatus::Running, true));
    gate.release();
    let paused = eventually(WAIT, "the run to pause", || async {
        let row = run_row(&engine, run).await;
        (row.status == RunStatus::Paused).then_some(row)
    })
    .await;
    assert_eq!(
        (
            paused.paused_from,
            paused.lease_owner,
            paused.ready_at,
            paused.pause_requested
        ),
        (Some(RunStatus::Running), None, None, false)
    );
    // Nothing more happens while it is paused: d is not started.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(run_row(&engine, run).await.status, RunStatus::Paused);
    assert_eq!(
        step_statuses(&engine, run).await,
        [
            StepStatus::Succeeded,
            StepStatus::Succeeded,
            StepStatus::Succeeded,
            StepStatus::Pending
        ]
    );
    assert_no_violations(&db.pool, &engine).await;
    match engine.pause(run, "ops").await {
        Err(EngineError::NotAllowed {
            action: "pause",
            status: RunStatus::Paused,
        }) => {}
        other => panic!("a paused run is not paused again: {other:?}"),
    }

    engine.resume(run, "ops@example.com").await.expect("resume");
    assert_eq!(finish(&engine, run).await, RunStatus::Completed);
    let entries = log(&engine, run).await;
    assert_eq!(
        entries[6..],
        [
            at(K::StepStarted, "c", 1),
            run_level(K::PauseRequested),
            at(K::StepSucceeded, "c", 1),
            run_level(K::RunPaused),
            run_level(K::RunResumed),
            run_level(K::RunClaimed),
            at(K::StepStarted, "d", 1),
            at(K::StepSucceeded, "d", 1),
            run_level(K::RunCompleted),
        ]
    );
    let events = engine.events(run).await.expect("events").expect("exists");
    assert_eq!(events[7].detail["by"], json!("ops@example.com"));
    assert_eq!(events[10].detail["to"], json!("running"));
    assert_eq!(effects(&db.pool, run).await.len(), 4, "each step once");
    for refused in [engine.pause(run, "ops").await, engine.resume(run, "ops").await] {
        assert!(
            matches!(
                refused,
                Err(EngineError::NotAllowed {
                    status: RunStatus::Completed,
                    ..
                })
            ),
            "{refused:?}"
        );
    }
    let missing = Uuid::now_v7();
    assert!(matches!(
        engine.pause(missing, "ops").await,
        Err(EngineError::RunNotFound(_))
    ));
    worker.shutdown().await;
}

#[tokio::test]
async fn a_run_without_a_worker_pauses_at_once_and_a_cancel_of_a_paused_run_compensates_it() {
    let db = test_db().await;
    let engine = engine(&db.pool, "n1");
    let run = trigger(&engine, json!({})).await;
    engine.pause(run, "ops").await.expect("pause");
    let row = run_row(&engine, run).await;
    assert_eq!(
        (row.status, row.paused_from),
        (RunStatus::Paused, Some(RunStatus::Pending))
    );
    let worker = engine.start_worker().await.expect("worker");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        run_row(&engine, run).await.status,
        RunStatus::Paused,
        "not claimed while paused"
    );
    engine.cancel(run, "ops").await.expect("a paused run can be cancelled");
    assert_eq!(finish(&engine, run).await, RunStatus::Cancelled);
    assert_eq!(
        log(&engine, run).await[..4],
        [
            run_level(K::RunCreated),
            run_level(K::RunPaused),
            run_level(K::CancelRequested),
            run_level(K::RunClaimed),
        ]
    );
    assert!(effects(&db.pool, run).await.is_empty());
    worker.shutdown().await;
}

#[tokio::test]
async fn a_paused_workflow_holds_its_new_runs_pending_until_it_is_resumed() {
    let db = test_db().await;
    let engine = engine(&db.pool, "n1");
    let before = trigger(&engine, json!({})).await;
    let ops = sagaflow::engine::machine::Actor::from("ops");
    assert_eq!(
        engine.pause_workflow(scripted::NAME, ops).await.expect("pause"),
        1,
        "the run not started"
    );
    match engine.pause_workflow(scripted::NAME, ops).await {
        Err(EngineError::WorkflowPauseState { paused: true, .. }) => {}
        other => panic!("paused already: {other:?}"),
    }
    assert!(matches!(
        engine.pause_workflow("no-such-workflow", ops).await,
        Err(EngineError::UnknownWorkflow(_))
    ));
    // A worker with free slots starts nothing of it, neither what was waiting nor what comes.
    let worker = engine.start_worker().await.expect("worker");
    let after = trigger(&engine, json!({})).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for run in [before, after] {
        let row = run_row(&engine, run).await;
        assert_eq!(
            (row.status, row.held, row.ready_at),
            (RunStatus::Pending, true, None),
            "{run}"
        );
    }
    let paused = engine.paused_workflows().await.expect("paused");
    assert_eq!(
        paused
            .iter()
            .map(|p| (p.workflow.as_str(), p.held_runs))
            .collect::<Vec<_>>(),
        [(scripted::NAME, 2)]
    );
    assert_no_violations(&db.pool, &engine).await;
    // A held run an operator cancels is not held any more: it ends now, the workflow paused.
    let cancelled = trigger(&engine, json!({})).await;
    assert!(run_row(&engine, cancelled).await.held);
    engine.cancel(cancelled, "ops").await.expect("cancel");
    assert_eq!(finish(&engine, cancelled).await, RunStatus::Cancelled);
    assert!(!run_row(&engine, cancelled).await.held);

    assert_eq!(engine.resume_workflow(scripted::NAME, ops).await.expect("resume"), 2);
    for run in [before, after] {
        assert_eq!(finish(&engine, run).await, RunStatus::Completed);
        assert!(!run_row(&engine, run).await.held);
    }
    match engine.resume_workflow(scripted::NAME, ops).await {
        Err(EngineError::WorkflowPauseState { paused: false, .. }) => {}
        other => panic!("not paused: {other:?}"),
    }
    let audit: Vec<(String, String)> =
        sqlx::query_as("SELECT action, operator FROM operator_actions WHERE action LIKE 'workflow.%' ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .expect("audit");
    assert_eq!(
        audit,
        [
            ("workflow.pause".into(), "ops".into()),
            ("workflow.resume".into(), "ops".into())
        ]
    );
    worker.shutdown().await;
}

/// Waits until `conn` is the only client connection to the test's database, so that the
/// statistics views hold every other backend's counts (a backend reports its counts when it
/// exits, and at most once a second before that).
async fn until_the_only_connection(conn: &mut sqlx::PgConnection) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let others: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'",
        )
        .fetch_one(&mut *conn)
        .await
        .expect("activity");
        if others == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{others} connections still open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sequential scans of `runs` in the test's database so far, by every connection that has
/// closed.
async fn runs_seq_scans(conn: &mut sqlx::PgConnection) -> i64 {
    until_the_only_connection(conn).await;
    sqlx::query_scalar("SELECT seq_scan FROM pg_stat_user_tables WHERE relname = 'runs'")
        .fetch_one(&mut *conn)
        .await
        .expect("seq scans")
}

/// Fills `runs` with `rows` finished runs, one a second back from now, each of the status
/// the SQL expression `status` gives (over `g`, the run's number), analyses them, closes the
/// test's pool, and returns a connection to watch what the connections opened later read.
async fn filled_and_watched(db: &common::TestDb, status: &str, rows: i64) -> sqlx::PgConnection {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO runs (id, workflow, workflow_version, status, input, subject, trigger,
                           created_at, updated_at, finished_at)
         SELECT gen_random_uuid(), 'scripted-local', 1, {status}, '{{}}', 'user' || g || '@example.com', 'api',
                now() - g * interval '1 second', now() - g * interval '1 second',
                now() - g * interval '1 second' + interval '40 milliseconds'
         FROM generate_series(1, $1) g"
    )))
    .bind(rows)
    .execute(&db.pool)
    .await
    .expect("fill");
    sqlx::query("ANALYZE runs").execute(&db.pool).await.expect("analyze");
    db.pool.close().await;
    <sqlx::PgConnection as sqlx::Connection>::connect(&db.url)
        .await
        .expect("connect")
}

/// Index entries of `runs` read so far, by every connection that has closed.
async fn runs_index_entries_read(conn: &mut sqlx::PgConnection) -> i64 {
    until_the_only_connection(conn).await;
    sqlx::query_scalar("SELECT sum(idx_tup_read)::int8 FROM pg_stat_user_indexes WHERE relname = 'runs'")
        .fetch_one(&mut *conn)
        .await
        .expect("index entries")
}

/// The dashboard's counts per status, on a table whose pages are not all-visible (what a busy
/// table's recent runs are: autovacuum is off here so that it stays so), read less than the
/// table once in all: a status with runs stops at the cap (walking the newest-first index, at
/// most cap ÷ its share of the runs), one without runs reads next to nothing. Counted with one
/// plan for every status, each of the four statuses without runs walked every run of the range.
#[tokio::test]
async fn counts_per_status_read_less_than_the_table_once_when_most_statuses_have_no_runs() {
    const RUNS: i64 = 60_000;
    const CAP: i64 = 1_000;
    let db = test_db().await;
    sqlx::query("ALTER TABLE runs SET (autovacuum_enabled = off)")
        .execute(&db.pool)
        .await
        .expect("autovacuum off");
    // The bench's mix: 70% completed, 10% each compensated, failed and cancelled.
    let status = "(ARRAY['completed','completed','completed','completed','completed','completed','completed',
                         'compensated','failed','cancelled'])[1 + (g * 7) % 10]::run_status";
    let mut observer = filled_and_watched(&db, status, RUNS).await;
    let before = runs_index_entries_read(&mut observer).await;

    let pools = sagaflow::pg::Pools::split(&db.url, &sagaflow::pg::PoolConfig::default()).expect("pools");
    let engine = Engine::builder(pools.api.clone()).build().expect("engine");
    let last_day = sagaflow::engine::RunFilter {
        created_from: Some(chrono::Utc::now() - chrono::Duration::hours(24)),
        ..sagaflow::engine::RunFilter::default()
    };
    let counts = sagaflow::engine::read::RunReads::of(&engine)
        .count_runs(&last_day, CAP)
        .await
        .expect("counts");
    pools.api.close().await;
    pools.worker.close().await;
    let read = runs_index_entries_read(&mut observer).await - before;

    let expected: Vec<(RunStatus, i64)> = RunStatus::ALL
        .into_iter()
        .map(|status| {
            let has_runs = matches!(
                status,
                RunStatus::Completed | RunStatus::Compensated | RunStatus::Failed | RunStatus::Cancelled
            );
            (status, if has_runs { CAP } else { 0 })
        })
        .collect();
    assert_eq!(counts, expected, "every status, in order, each at its cap or empty");
    // At most: 1,000 ÷ 0.7 entries for the completed, 1,000 ÷ 0.1 for each other status with
    // runs (31,419 seen, each of those three walking the newest-first index), nothing for the
    // four without; one plan for all read 271,412.
    assert!(
        read < RUNS,
        "counting read {read} index entries of runs, more than the {RUNS} runs there are"
    );
}

/// The worker's pool plans each statement once (`force_generic_plan`), blind to its
/// parameters; the API's plans each execution. On 200,000 finished runs, a worker that claims
/// and runs runs, takes over lost leases and sweeps old runs reads `runs` only through its
/// indexes: a range the planner could not bound would read the whole table at every claim.
/// The one sequential scan is the probe that shows this test sees the worker pool's scans.
#[tokio::test]
async fn the_worker_pool_plans_once_and_reads_a_large_runs_table_only_through_its_indexes() {
    let db = test_db().await;
    let mut observer = filled_and_watched(&db, "'completed'", 200_000).await;
    let before = runs_seq_scans(&mut observer).await;

    let pools = sagaflow::pg::Pools::split(&db.url, &sagaflow::pg::PoolConfig::default()).expect("pools");
    let setting = |pool: PgPool| async move {
        sqlx::query_scalar::<_, String>("SHOW plan_cache_mode")
            .fetch_one(&pool)
            .await
            .expect("setting")
    };
    assert_eq!(setting(pools.worker.clone()).await, "force_generic_plan");
    assert_eq!(setting(pools.api.clone()).await, "auto");
    // The probe: no index can serve it, and `FOR UPDATE` keeps it one scan (not parallel).
    let probed: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM runs WHERE input ->> 'probe' = $1 FOR UPDATE")
        .bind("x")
        .fetch_all(&pools.worker)
        .await
        .expect("probe");
    assert!(probed.is_empty());

    let engine = Engine::builder(pools.api.clone())
        .worker_pool(pools.worker.clone())
        .config(fast_config("plans"))
        .register(scripted::local_workflow())
        .build()
        .expect("engine");
    let worker = engine.start_worker().await.expect("worker");
    let mut runs = Vec::new();
    for i in 0..20 {
        let run = engine
            .trigger(
                scripted::LOCAL_NAME,
                json!({"subject": format!("plans{i}@example.com")}),
                TriggerOptions::default(),
            )
            .await
            .expect("trigger")
            .run_id;
        runs.push(run);
    }
    for run in runs {
        assert_eq!(finish(&engine, run).await, RunStatus::Completed);
    }
    // A few rounds of claims and lease checks with nothing to find.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let swept = engine
        .delete_finished_runs(chrono::Utc::now() - chrono::Duration::days(1), 100)
        .await
        .expect("sweep");
    assert_eq!(swept, 100, "the oldest runs, through the finished-at index");
    worker.shutdown().await;
    pools.api.close().await;
    pools.worker.close().await;

    assert_eq!(
        runs_seq_scans(&mut observer).await - before,
        1,
        "only the probe read runs sequentially"
    );
}

/// Two instances recording the same version's plan at the same moment: the second insert
/// waits for the first and does nothing, and its statement's snapshot, taken before the
/// first committed, does not show the row. It must read the row the other instance wrote
/// (here a plan with other steps, so the answer is `PlanChanged`), not fail as if the row
/// were missing; that failure answered 500 to a `PUT` of a definition while another instance
/// started.
#[tokio::test]
async fn a_plan_recorded_by_another_instance_at_the_same_moment_is_read_not_missed() {
    let db = test_db().await;
    let engine = engine(&db.pool, "racing");
    let mut other = db.pool.begin().await.expect("begin");
    sqlx::query(
        "INSERT INTO workflow_plans (workflow, version, plan_hash, steps, defined)
         VALUES ($1, 1, 'another instance''s plan', '{a,b,c}', false)",
    )
    .bind(scripted::NAME)
    .execute(&mut *other)
    .await
    .expect("the other instance's plan");
    let recording = tokio::spawn({
        let engine = engine.clone();
        async move { engine.record_plans().await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !recording.is_finished(),
        "the insert waits for the other instance's transaction"
    );
    other.commit().await.expect("commit");
    match recording.await.expect("task") {
        Err(EngineError::PlanChanged { stored, .. }) => assert_eq!(stored, ["a", "b", "c"]),
        other => panic!("expected the other instance's plan to be read: {other:?}"),
    }
}

/// An engine running the local scripted workflow, fused and batched, with room beyond a
/// claim's batch so that a trigger always starts its run here: a waiting trigger's run is
/// then inserted by its first segment.
async fn inserting_engine(pool: &PgPool) -> (Engine, WorkerHandle) {
    let engine = Engine::builder(pool.clone())
        .config(sagaflow::engine::EngineConfig {
            max_concurrent_runs: 64,
            ..fast_config("inserting")
        })
        .register(scripted::local_workflow())
        .build()
        .expect("engine");
    let worker = engine.start_worker().await.expect("worker");
    (engine, worker)
}

/// Waiting triggers of one key at once: each run's first segment tries to insert it, all but
/// one find the key taken when they write (nothing of their steps stays), and every caller is
/// answered with the one run, which did each step once.
#[tokio::test]
async fn waiting_triggers_of_one_key_at_once_insert_one_run_and_all_answer_with_it() {
    let db = test_db().await;
    let (engine, worker) = inserting_engine(&db.pool).await;
    let options = || TriggerOptions {
        idempotency_key: Some("one-key".into()),
        ..TriggerOptions::default()
    };
    let waits =
        (0..8).map(|_| engine.trigger_and_wait(scripted::LOCAL_NAME, json!({}), options(), Duration::from_secs(10)));
    let answers = futures::future::join_all(waits).await;
    let mut ids = std::collections::HashSet::new();
    let mut created = 0;
    for answer in answers {
        let waited = answer.expect("every trigger is answered");
        ids.insert(waited.triggered.run_id);
        created += usize::from(waited.triggered.created);
        let detail = waited.detail.expect("the run");
        assert_eq!(detail.run.status, RunStatus::Completed);
    }
    assert_eq!(ids.len(), 1, "one run for one key: {ids:?}");
    assert_eq!(created, 1, "one trigger created it");
    let run = *ids.iter().next().expect("the run");
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM runs")
        .fetch_one(&db.pool)
        .await
        .expect("count");
    assert_eq!(runs, 1);
    let mut done = effects(&db.pool, run).await;
    done.sort();
    assert_eq!(
        done,
        ["a", "b", "c", "d"].map(|s| effect(s, "invoke", 1)).to_vec(),
        "each step once, none of the refused segments' work"
    );
    let others: i64 = sqlx::query_scalar("SELECT count(*) FROM test_effects WHERE run_id <> $1")
        .bind(run)
        .fetch_one(&db.pool)
        .await
        .expect("count");
    assert_eq!(others, 0, "the refused runs left nothing");
    worker.shutdown().await;
}

/// A waiting trigger of a paused workflow: its first segment runs, finds the workflow paused
/// when it writes, and leaves nothing of its steps; the run goes in held `pending`, as from a
/// trigger that does not wait, and runs once the workflow is resumed.
#[tokio::test]
async fn a_waiting_trigger_of_a_paused_workflow_leaves_its_run_held_with_nothing_done() {
    let db = test_db().await;
    let (engine, worker) = inserting_engine(&db.pool).await;
    let ops = sagaflow::engine::machine::Actor::from("ops");
    engine.pause_workflow(scripted::LOCAL_NAME, ops).await.expect("pause");
    let waited = engine
        .trigger_and_wait(
            scripted::LOCAL_NAME,
            json!({}),
            TriggerOptions::default(),
            Duration::from_millis(300),
        )
        .await
        .expect("trigger");
    assert!(waited.triggered.created);
    let run = waited.triggered.run_id;
    let detail = waited.detail.expect("the run");
    assert_eq!(detail.run.status, RunStatus::Pending);
    assert!(detail.run.held, "held by the pause");
    assert!(effects(&db.pool, run).await.is_empty(), "nothing of the segment stays");
    assert_eq!(log(&engine, run).await, [run_level(K::RunCreated)]);
    engine.resume_workflow(scripted::LOCAL_NAME, ops).await.expect("resume");
    assert_eq!(finish(&engine, run).await, RunStatus::Completed);
    worker.shutdown().await;
}

/// A worker that starts draining while a waiting trigger's first segment runs: the segment
/// ends by handing the run back, and the run is inserted so, due, with the steps it did kept;
/// the trigger is answered with it pending, and another worker finishes it without doing a
/// step again.
#[tokio::test]
async fn a_run_whose_inserting_segment_ends_in_a_drain_is_inserted_handed_back() {
    let db = test_db().await;
    let (engine, worker) = inserting_engine(&db.pool).await;
    // b sleeps long enough for the drain to begin while the segment runs.
    let input = json!({"sleep_attempts": {"b": 1}, "sleep_ms": {"b": 1500}});
    let waiting = {
        let engine = engine.clone();
        tokio::spawn(async move {
            engine
                .trigger_and_wait(
                    scripted::LOCAL_NAME,
                    input,
                    TriggerOptions::default(),
                    Duration::from_secs(5),
                )
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM runs")
        .fetch_one(&db.pool)
        .await
        .expect("count");
    assert_eq!(runs, 0, "the run is not inserted while its first segment runs");
    worker.shutdown().await;
    let waited = waiting.await.expect("task").expect("trigger");
    let run = waited.triggered.run_id;
    let detail = waited.detail.expect("the run");
    assert_eq!(detail.run.status, RunStatus::Running, "handed back, not finished");
    assert_eq!(detail.run.lease_owner, None);
    assert!(detail.run.ready_at.is_some(), "due again at once");
    let transactions: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT x) FROM (SELECT xmin::text AS x FROM runs WHERE id = $1
                                        UNION ALL SELECT xmin::text FROM run_events WHERE run_id = $1) w",
    )
    .bind(run)
    .fetch_one(&db.pool)
    .await
    .expect("transactions");
    assert_eq!(transactions, 1, "inserted handed back, by the segment's one commit");
    assert!(log(&engine, run).await.contains(&run_level(K::LeaseReleased)));

    let (other, other_worker) = inserting_engine(&db.pool).await;
    assert_eq!(finish(&other, run).await, RunStatus::Completed);
    let mut done = effects(&db.pool, run).await;
    done.sort();
    assert_eq!(
        done,
        ["a", "b", "c", "d"].map(|s| effect(s, "invoke", 1)).to_vec(),
        "no step done twice"
    );
    other_worker.shutdown().await;
}

/// A waiting trigger is answered once its run is inserted, and the first segment inserts it:
/// when the wait runs out first, the segment ends after the attempt under way, so the answer
/// comes one attempt past the wait, not at the end of every local step (which would have
/// finished this run in that one segment).
#[tokio::test]
async fn a_waiting_trigger_whose_wait_runs_out_mid_segment_is_answered_after_the_attempt_under_way() {
    let db = test_db().await;
    let (engine, worker) = inserting_engine(&db.pool).await;
    // b takes 500 ms, well past the wait. c takes 200 ms (under its 300 ms timeout): once
    // the segment with a and b commits, the next one may run at once, and the answer, built
    // when the waiter looks, would say `completed` had the rest finished before it looked
    // (on a loaded machine).
    let input = json!({"sleep_attempts": {"b": 1, "c": 1}, "sleep_ms": {"b": 500, "c": 200}});
    let waited = engine
        .trigger_and_wait(
            scripted::LOCAL_NAME,
            input,
            TriggerOptions::default(),
            Duration::from_millis(100),
        )
        .await
        .expect("trigger");
    let run = waited.triggered.run_id;
    let detail = waited.detail.expect("the run");
    assert_eq!(
        detail.run.status,
        RunStatus::Running,
        "answered before the rest of the run's local steps ran"
    );
    let answered: Vec<StepStatus> = detail.steps.iter().map(|s| s.status).collect();
    assert_eq!(
        answered[..2],
        [StepStatus::Succeeded, StepStatus::Succeeded],
        "a and b, the attempt under way when the wait ran out, went in with the run"
    );
    assert_ne!(answered[2], StepStatus::Succeeded, "c came after the answer");
    assert_eq!(finish(&engine, run).await, RunStatus::Completed);
    let mut done = effects(&db.pool, run).await;
    done.sort();
    assert_eq!(done, ["a", "b", "c", "d"].map(|s| effect(s, "invoke", 1)).to_vec());
    worker.shutdown().await;
}
