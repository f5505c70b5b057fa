//! Cron schedules against a real PostgreSQL: ticks fire exactly once across instances, missed
//! ticks follow the catch-up policy, the overlap policy holds, disabling or deleting stops a
//! schedule, the retention sweep deletes exactly what it should. Time is a manual clock: no
//! test waits for a real minute.

mod common;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::scripted::{self, gate};
use common::{eventually, fast_config, test_db};
use sagaflow::engine::scheduler::{
    CatchUp, CatchUpRules, ManualClock, Overlap, ScheduleError, ScheduleSpec, SchedulerConfig, tick_key,
};
use sagaflow::engine::{Engine, EngineError, RunStatus, Trigger, TriggerOptions};
use sagaflow::workflows::retention;
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(20);

fn t(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text).expect("time").with_timezone(&Utc)
}

/// Far from the real clock: only the manual clock makes ticks due.
fn manual_clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::new(t("2030-01-01T00:00:30Z")))
}

fn engine_at(pool: &PgPool, node: &str, clock: Option<Arc<ManualClock>>) -> Engine {
    let mut builder = Engine::builder(pool.clone())
        .config(fast_config(node))
        .register(scripted::workflow())
        .register(retention::workflow(Duration::from_secs(7 * 24 * 3600)));
    if let Some(clock) = clock {
        builder = builder.clock(clock);
    }
    builder.build().expect("engine")
}

fn scheduler_config() -> SchedulerConfig {
    SchedulerConfig {
        catch_up: CatchUpRules {
            grace: chrono::Duration::seconds(30),
            limit: 5,
        },
        max_sleep: Duration::from_secs(60),
        retry_after: Duration::from_millis(100),
        busy_backoff: Duration::from_millis(20),
    }
}

fn spec(name: &str, expression: &str, overlap: Overlap, catch_up: CatchUp) -> ScheduleSpec {
    ScheduleSpec {
        name: name.into(),
        expression: expression.into(),
        time_zone: "UTC".into(),
        workflow: scripted::NAME.into(),
        input: json!({}),
        enabled: true,
        overlap,
        catch_up,
    }
}

/// The ticks a schedule's runs were started for (from their idempotency keys), in order,
/// checking each run's trigger is `schedule`.
async fn fired_ticks(pool: &PgPool, name: &str) -> Vec<String> {
    let rows: Vec<(String, Trigger)> = sqlx::query_as(
        "SELECT idempotency_key, trigger FROM runs WHERE starts_with(idempotency_key, 'schedule:' || $1 || ':')
         ORDER BY idempotency_key",
    )
    .bind(name)
    .fetch_all(pool)
    .await
    .expect("runs");
    rows.into_iter()
        .map(|(key, trigger)| {
            assert_eq!(trigger, Trigger::Schedule, "{key}");
            key.trim_start_matches(&format!("schedule:{name}:")).to_string()
        })
        .collect()
}

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
        .fetch_one(pool)
        .await
        .expect("count")
}

async fn next_fire(engine: &Engine, name: &str) -> Option<DateTime<Utc>> {
    engine
        .schedule(name)
        .await
        .expect("schedule")
        .expect("exists")
        .schedule
        .next_fire_at
}

/// Waits until the scheduler moved each schedule to `next` (it handled everything before).
async fn wait_next_fire(engine: &Engine, names: &[&str], next: &str) {
    for name in names {
        eventually(WAIT, &format!("{name} to move on to {next}"), || async {
            (next_fire(engine, name).await == Some(t(next))).then_some(())
        })
        .await;
    }
}

#[tokio::test]
async fn two_instances_with_an_every_second_schedule_fire_each_tick_once() {
    let db = test_db().await;
    let (a, b) = (engine_at(&db.pool, "a", None), engine_at(&db.pool, "b", None));
    let workers = [
        a.start_worker().await.expect("worker"),
        b.start_worker().await.expect("worker"),
    ];
    let schedulers = [
        a.start_scheduler(SchedulerConfig::default()).await.expect("scheduler"),
        b.start_scheduler(SchedulerConfig::default()).await.expect("scheduler"),
    ];
    a.create_schedule(spec("every-second", "* * * * * *", Overlap::Allow, CatchUp::None))
        .await
        .expect("create");
    eventually(WAIT, "four ticks", || async {
        (fired_ticks(&db.pool, "every-second").await.len() >= 4).then_some(())
    })
    .await;
    b.delete_schedule("every-second").await.expect("delete");
    for s in schedulers {
        s.shutdown().await;
    }

    let ticks: Vec<DateTime<Utc>> = fired_ticks(&db.pool, "every-second")
        .await
        .iter()
        .map(|k| t(k))
        .collect();
    // Every second from the first tick to the last, none missing, none twice.
    for pair in ticks.windows(2) {
        assert_eq!(pair[1] - pair[0], chrono::Duration::seconds(1), "ticks {ticks:?}");
    }
    for run in sqlx::query_scalar::<_, Uuid>("SELECT id FROM runs")
        .fetch_all(&db.pool)
        .await
        .expect("runs")
    {
        assert_eq!(
            a.wait_for_terminal(run, WAIT).await.expect("wait"),
            RunStatus::Completed
        );
    }
    for w in workers {
        w.shutdown().await;
    }
}

#[tokio::test]
async fn instances_woken_by_the_same_tick_start_one_run_for_it() {
    let db = test_db().await;
    let clock = manual_clock();
    let engines: Vec<Engine> = ["a", "b", "c"]
        .iter()
        .map(|n| engine_at(&db.pool, n, Some(Arc::clone(&clock))))
        .collect();
    engines[0]
        .create_schedule(spec("shared", "* * * * * *", Overlap::Allow, CatchUp::None))
        .await
        .expect("create");
    let mut schedulers = Vec::new();
    for e in &engines {
        schedulers.push(e.start_scheduler(scheduler_config()).await.expect("scheduler"));
    }
    // Three schedulers sleep until the same instant; move the clock one tick at a time.
    let first = t("2030-01-01T00:00:31Z");
    for i in 0..15 {
        clock.set(first + chrono::Duration::seconds(i));
        eventually(WAIT, "the tick's run", || async {
            (fired_ticks(&db.pool, "shared").await.len() as i64 == i + 1).then_some(())
        })
        .await;
    }
    wait_next_fire(&engines[1], &["shared"], "2030-01-01T00:00:46Z").await;
    for s in schedulers {
        s.shutdown().await;
    }
    let expected: Vec<String> = (0..15)
        .map(|i| tick_key("shared", first + chrono::Duration::seconds(i)))
        .map(|k| k.trim_start_matches("schedule:shared:").to_string())
        .collect();
    assert_eq!(fired_ticks(&db.pool, "shared").await, expected);
    assert_eq!(count(&db.pool, "SELECT count(*) FROM schedule_fires").await, 15);
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM schedule_fires f JOIN runs r ON r.id = f.run_id AND r.idempotency_key = 'schedule:shared:' || to_char(f.tick AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')").await,
        15,
        "each fire records the run of its own tick"
    );
}

#[tokio::test]
async fn a_tick_started_before_a_crash_is_recorded_not_started_twice() {
    let db = test_db().await;
    let clock = manual_clock();
    let engine = engine_at(&db.pool, "n", Some(Arc::clone(&clock)));
    let first = t("2030-01-01T00:01:00Z");
    for name in ["same-input", "input-changed-since"] {
        engine
            .create_schedule(spec(name, "* * * * *", Overlap::Allow, CatchUp::None))
            .await
            .expect("create");
    }
    // What an instance that died after starting the tick's run, before recording it, left.
    let started = |input: Value, name: &str| {
        let engine = engine.clone();
        let key = tick_key(name, first);
        async move {
            engine
                .trigger(
                    scripted::NAME,
                    input,
                    TriggerOptions {
                        idempotency_key: Some(key),
                        trigger: Some(Trigger::Schedule),
                    },
                )
                .await
                .expect("trigger")
                .run_id
        }
    };
    let same = started(json!({}), "same-input").await;
    let changed = started(json!({"subject": "before the change"}), "input-changed-since").await;

    clock.set(first);
    let scheduler = engine.start_scheduler(scheduler_config()).await.expect("scheduler");
    wait_next_fire(&engine, &["same-input", "input-changed-since"], "2030-01-01T00:02:00Z").await;
    scheduler.shutdown().await;

    for (name, run) in [("same-input", same), ("input-changed-since", changed)] {
        assert_eq!(fired_ticks(&db.pool, name).await, ["2030-01-01T00:01:00Z"], "{name}");
        let view = engine.schedule(name).await.expect("view").expect("exists");
        assert_eq!(view.schedule.last_run_id, Some(run), "{name}");
        assert_eq!(view.schedule.last_fire_at, Some(first));
        assert_eq!(view.schedule.last_error, None);
        let recorded: Vec<Uuid> = view.recent_runs.iter().map(|r| r.run_id).collect();
        assert_eq!(recorded, [run], "{name}");
    }
}

#[tokio::test]
async fn an_instance_down_across_several_ticks_honours_the_catch_up_policy() {
    let db = test_db().await;
    let clock = manual_clock();
    let engine = engine_at(&db.pool, "n", Some(Arc::clone(&clock)));
    let names = ["none", "latest", "all"];
    for (name, policy) in names.iter().zip([CatchUp::None, CatchUp::Latest, CatchUp::All]) {
        engine
            .create_schedule(spec(name, "* * * * *", Overlap::Allow, policy))
            .await
            .expect("create");
    }
    let fired = |name: &'static str| {
        let pool = db.pool.clone();
        async move { fired_ticks(&pool, name).await }
    };

    // Nothing runs from 00:00:30 to 00:10:45: ticks 00:01 to 00:10 are missed (the last by 45 s,
    // more than the 30 s grace). The bound of the test scheduler is 5 ticks.
    clock.set(t("2030-01-01T00:10:45Z"));
    let scheduler = engine.start_scheduler(scheduler_config()).await.expect("scheduler");
    wait_next_fire(&engine, &names, "2030-01-01T00:11:00Z").await;
    scheduler.shutdown().await;
    assert_eq!(fired("none").await, Vec::<String>::new());
    assert_eq!(fired("latest").await, ["2030-01-01T00:10:00Z"]);
    assert_eq!(
        fired("all").await,
        [
            "2030-01-01T00:06:00Z",
            "2030-01-01T00:07:00Z",
            "2030-01-01T00:08:00Z",
            "2030-01-01T00:09:00Z",
            "2030-01-01T00:10:00Z"
        ]
    );

    // Down again across three ticks, within the bound: `all` fires each of them.
    clock.set(t("2030-01-01T00:13:40Z"));
    let scheduler = engine.start_scheduler(scheduler_config()).await.expect("scheduler");
    wait_next_fire(&engine, &names, "2030-01-01T00:14:00Z").await;
    assert_eq!(fired("none").await, Vec::<String>::new());
    assert_eq!(fired("latest").await, ["2030-01-01T00:10:00Z", "2030-01-01T00:13:00Z"]);
    assert_eq!(fired("all").await.len(), 8);
    assert_eq!(
        fired("all").await[5..],
        ["2030-01-01T00:11:00Z", "2030-01-01T00:12:00Z", "2030-01-01T00:13:00Z"]
    );

    // Running: a tick fired within the grace period is on time for every policy.
    clock.set(t("2030-01-01T00:14:10Z"));
    wait_next_fire(&engine, &names, "2030-01-01T00:15:00Z").await;
    scheduler.shutdown().await;
    assert_eq!(fired("none").await, ["2030-01-01T00:14:00Z"]);
    assert_eq!(fired("latest").await.len(), 3);
    assert_eq!(fired("all").await.len(), 9);
}

#[tokio::test]
async fn overlap_skip_waits_for_the_run_in_flight_and_allow_does_not() {
    let db = test_db().await;
    let clock = manual_clock();
    let engine = engine_at(&db.pool, "n", Some(Arc::clone(&clock)));
    let worker = engine.start_worker().await.expect("worker");
    let blocking = json!({"block": {"a": 1}});
    for (name, overlap) in [("skipper", Overlap::Skip), ("allower", Overlap::Allow)] {
        let spec = ScheduleSpec {
            input: blocking.clone(),
            ..spec(name, "* * * * *", overlap, CatchUp::None)
        };
        engine.create_schedule(spec).await.expect("create");
    }
    let scheduler = engine.start_scheduler(scheduler_config()).await.expect("scheduler");
    let runs_of = |name: &'static str| {
        let engine = engine.clone();
        async move {
            let mut runs: Vec<Uuid> = engine
                .schedule_runs(name, 100)
                .await
                .expect("runs")
                .iter()
                .map(|r| r.run_id)
                .collect();
            runs.reverse();
            runs
        }
    };

    clock.set(t("2030-01-01T00:01:00Z"));
    wait_next_fire(&engine, &["skipper", "allower"], "2030-01-01T00:02:00Z").await;
    let first = runs_of("skipper").await;
    assert_eq!(first.len(), 1);
    gate(first[0]).wait_entered().await;

    // The first run is still in its step: skip skips, allow starts a second run.
    clock.set(t("2030-01-01T00:02:00Z"));
    wait_next_fire(&engine, &["skipper", "allower"], "2030-01-01T00:03:00Z").await;
    assert_eq!(runs_of("skipper").await, first);
    assert_eq!(runs_of("allower").await.len(), 2);
    assert!(matches!(
        engine.fire_schedule("skipper", "ops").await,
        Err(ScheduleError::InFlight(_))
    ));

    // Once it finished, the next tick fires again.
    gate(first[0]).release();
    assert_eq!(
        engine.wait_for_terminal(first[0], WAIT).await.expect("wait"),
        RunStatus::Completed
    );
    clock.set(t("2030-01-01T00:03:00Z"));
    wait_next_fire(&engine, &["skipper"], "2030-01-01T00:04:00Z").await;
    assert_eq!(
        fired_ticks(&db.pool, "skipper").await,
        ["2030-01-01T00:01:00Z", "2030-01-01T00:03:00Z"]
    );
    scheduler.shutdown().await;
    release_all(&engine, &worker_runs(&db.pool).await).await;
    worker.shutdown().await;
}

async fn worker_runs(pool: &PgPool) -> Vec<Uuid> {
    sqlx::query_scalar("SELECT id FROM runs WHERE status IN ('pending', 'running')")
        .fetch_all(pool)
        .await
        .expect("runs")
}

async fn release_all(engine: &Engine, runs: &[Uuid]) {
    for run in runs {
        gate(*run).wait_entered().await;
        gate(*run).release();
        engine.wait_for_terminal(*run, WAIT).await.expect("wait");
    }
}

#[tokio::test]
async fn disabling_or_deleting_a_schedule_stops_it() {
    let db = test_db().await;
    let clock = manual_clock();
    let engine = engine_at(&db.pool, "n", Some(Arc::clone(&clock)));
    // The sentinel fires at every tick, showing the scheduler did look at that minute.
    for name in ["sentinel", "target"] {
        engine
            .create_schedule(spec(name, "* * * * *", Overlap::Allow, CatchUp::All))
            .await
            .expect("create");
    }
    let scheduler = engine.start_scheduler(scheduler_config()).await.expect("scheduler");
    clock.set(t("2030-01-01T00:01:00Z"));
    wait_next_fire(&engine, &["sentinel", "target"], "2030-01-01T00:02:00Z").await;
    assert_eq!(fired_ticks(&db.pool, "target").await, ["2030-01-01T00:01:00Z"]);

    let disabled = engine.set_schedule_enabled("target", false).await.expect("disable");
    assert_eq!(disabled.schedule.next_fire_at, None);
    assert!(disabled.upcoming.is_empty());
    for minute in ["00:02:00", "00:03:00"] {
        clock.set(t(&format!("2030-01-01T{minute}Z")));
        eventually(WAIT, "the sentinel's tick", || async {
            fired_ticks(&db.pool, "sentinel")
                .await
                .contains(&format!("2030-01-01T{minute}Z"))
                .then_some(())
        })
        .await;
    }
    assert_eq!(fired_ticks(&db.pool, "target").await, ["2030-01-01T00:01:00Z"]);

    // Enabled again at 00:03:20: from the next tick on, without catching up 00:02 and 00:03.
    clock.set(t("2030-01-01T00:03:20Z"));
    let enabled = engine.set_schedule_enabled("target", true).await.expect("enable");
    assert_eq!(enabled.schedule.next_fire_at, Some(t("2030-01-01T00:04:00Z")));
    assert_eq!(enabled.upcoming.len(), 5);
    clock.set(t("2030-01-01T00:04:00Z"));
    wait_next_fire(&engine, &["sentinel", "target"], "2030-01-01T00:05:00Z").await;
    assert_eq!(
        fired_ticks(&db.pool, "target").await,
        ["2030-01-01T00:01:00Z", "2030-01-01T00:04:00Z"]
    );

    engine.delete_schedule("target").await.expect("delete");
    assert!(engine.schedule("target").await.expect("read").is_none());
    assert!(matches!(
        engine.delete_schedule("target").await,
        Err(ScheduleError::NotFound(_))
    ));
    clock.set(t("2030-01-01T00:05:00Z"));
    wait_next_fire(&engine, &["sentinel"], "2030-01-01T00:06:00Z").await;
    // Its runs stay; no new one.
    assert_eq!(fired_ticks(&db.pool, "target").await.len(), 2);
    scheduler.shutdown().await;
}

#[tokio::test]
async fn a_tick_the_engine_refuses_is_recorded_and_the_schedule_moves_on() {
    let db = test_db().await;
    let clock = manual_clock();
    let engine = engine_at(&db.pool, "n", Some(Arc::clone(&clock)));
    engine
        .create_schedule(spec("orphan", "* * * * *", Overlap::Allow, CatchUp::None))
        .await
        .expect("create");
    // After a deploy that dropped the workflow: the same database, an engine without it.
    let without = Engine::builder(db.pool.clone())
        .config(fast_config("m"))
        .clock(Arc::clone(&clock) as _)
        .build()
        .expect("engine");
    let scheduler = without.start_scheduler(scheduler_config()).await.expect("scheduler");
    clock.set(t("2030-01-01T00:01:00Z"));
    wait_next_fire(&without, &["orphan"], "2030-01-01T00:02:00Z").await;
    scheduler.shutdown().await;
    let view = without.schedule("orphan").await.expect("read").expect("exists");
    assert_eq!(view.schedule.last_error.as_deref(), Some("unknown workflow `scripted`"));
    assert!(fired_ticks(&db.pool, "orphan").await.is_empty());
    assert!(matches!(
        without.fire_schedule("orphan", "ops").await,
        Err(ScheduleError::Engine(EngineError::UnknownWorkflow(_)))
    ));
    assert_eq!(count(&db.pool, "SELECT count(*) FROM schedule_fires").await, 0);
}

#[tokio::test]
async fn a_stored_expression_no_longer_understood_stops_the_schedule_and_says_why() {
    let db = test_db().await;
    let clock = manual_clock();
    let engine = engine_at(&db.pool, "n", Some(Arc::clone(&clock)));
    engine
        .create_schedule(spec("legacy", "* * * * *", Overlap::Allow, CatchUp::None))
        .await
        .expect("create");
    // As if written by a version that accepted more than this one does.
    sqlx::query("UPDATE schedules SET expression = '0 0 0 * * * * *' WHERE name = 'legacy'")
        .execute(&db.pool)
        .await
        .expect("update");
    let scheduler = engine.start_scheduler(scheduler_config()).await.expect("scheduler");
    clock.set(t("2030-01-01T00:01:00Z"));
    let view = eventually(WAIT, "the schedule to stop", || async {
        let view = engine.schedule("legacy").await.expect("read").expect("exists");
        view.schedule.last_error.is_some().then_some(view)
    })
    .await;
    scheduler.shutdown().await;
    assert_eq!(view.schedule.next_fire_at, None);
    assert!(view.upcoming.is_empty());
    assert!(view.description.contains("not understood"), "{}", view.description);
    assert!(fired_ticks(&db.pool, "legacy").await.is_empty());
    // It can be switched off, not on.
    assert!(matches!(
        engine.set_schedule_enabled("legacy", true).await,
        Err(ScheduleError::Expression(_))
    ));
    let off = engine.set_schedule_enabled("legacy", false).await.expect("disable");
    assert!(!off.schedule.enabled);
}

#[tokio::test]
async fn two_creates_racing_for_a_name_make_one_schedule() {
    let db = test_db().await;
    let engine = engine_at(&db.pool, "n", Some(manual_clock()));
    let make = || engine.create_schedule(spec("contested", "@daily", Overlap::Skip, CatchUp::Latest));
    let (a, b) = tokio::join!(make(), make());
    let outcomes = [a.is_ok(), b.is_ok()];
    assert_eq!(outcomes.iter().filter(|ok| **ok).count(), 1, "{a:?} {b:?}");
    assert!(matches!(a.err().or(b.err()), Some(ScheduleError::Duplicate(name)) if name == "contested"));
    assert_eq!(count(&db.pool, "SELECT count(*) FROM schedules").await, 1);
}

// ---------------------------------------------------------------------------------------
// The retention sweep
// ---------------------------------------------------------------------------------------

/// Inserts `n` completed runs that finished `days` ago, each with a step and two log entries.
async fn old_runs(pool: &PgPool, n: i32, days: i32) -> Vec<Uuid> {
    sqlx::query_scalar(
        "WITH runs AS (
             INSERT INTO runs (id, workflow, workflow_version, status, input, trigger, created_at, updated_at,
                               finished_at, log_seq)
             SELECT gen_random_uuid(), 'scripted', 1, 'completed', '{}', 'api',
                    now() - make_interval(days => $2 + 1), now() - make_interval(days => $2),
                    now() - make_interval(days => $2), 2
             FROM generate_series(1, $1)
             RETURNING id
         ), steps AS (
             INSERT INTO run_steps (run_id, idx, name, status, attempts) SELECT id, 0, 'a', 'succeeded', 1 FROM runs
         ), events AS (
             INSERT INTO run_events (run_id, seq, kind) SELECT id, s, 'run_created' FROM runs, generate_series(1, 2) s
         )
         SELECT id FROM runs",
    )
    .bind(n)
    .bind(days)
    .fetch_all(pool)
    .await
    .expect("old runs")
}

async fn finish_days_ago(pool: &PgPool, runs: &[Uuid], days: i32) {
    sqlx::query("UPDATE runs SET finished_at = now() - make_interval(days => $2) WHERE id = ANY($1)")
        .bind(runs)
        .bind(days)
        .execute(pool)
        .await
        .expect("backdate");
}

async fn sweep(engine: &Engine, input: Value) -> Value {
    let run = engine
        .trigger(retention::NAME, input, TriggerOptions::default())
        .await
        .expect("trigger")
        .run_id;
    assert_eq!(
        engine.wait_for_terminal(run, WAIT).await.expect("wait"),
        RunStatus::Completed
    );
    engine
        .run(run)
        .await
        .expect("run")
        .expect("exists")
        .run
        .output
        .expect("output")
}

#[tokio::test]
async fn the_retention_sweep_removes_exactly_what_it_should() {
    let db = test_db().await;
    let engine = engine_at(&db.pool, "n", None);
    let worker = engine.start_worker().await.expect("worker");
    let run = |input: Value| {
        let engine = engine.clone();
        async move {
            let id = engine
                .trigger(scripted::NAME, input, TriggerOptions::default())
                .await
                .expect("trigger")
                .run_id;
            engine.wait_for_terminal(id, WAIT).await.expect("wait");
            id
        }
    };
    // Terminal runs of each kind, finished 40 days ago: all go.
    let completed = run(json!({})).await;
    let compensated = run(json!({"permanent": {"c": true}})).await;
    let failed = run(json!({"permanent": {"c": true}, "comp_permanent": {"b": true}})).await;
    let cancelled = engine
        .trigger(scripted::NAME, json!({"block": {"a": 1}}), TriggerOptions::default())
        .await
        .expect("trigger")
        .run_id;
    gate(cancelled).wait_entered().await;
    engine.cancel(cancelled, "ops").await.expect("cancel");
    gate(cancelled).release();
    engine.wait_for_terminal(cancelled, WAIT).await.expect("wait");
    let statuses: Vec<RunStatus> = sqlx::query_scalar("SELECT status FROM runs WHERE id = ANY($1) ORDER BY status")
        .bind([completed, compensated, failed, cancelled])
        .fetch_all(&db.pool)
        .await
        .expect("statuses");
    assert_eq!(
        statuses,
        [
            RunStatus::Completed,
            RunStatus::Compensated,
            RunStatus::Failed,
            RunStatus::Cancelled
        ]
    );
    let old = [completed, compensated, failed, cancelled];
    finish_days_ago(&db.pool, &old, 40).await;
    // A recent retry of the old compensated run stays, its link to it cleared.
    let retry = match engine.retry(compensated, "ops").await.expect("retry") {
        sagaflow::engine::Retried::NewRun(id) => id,
        other => panic!("expected a new run, got {other:?}"),
    };
    engine.wait_for_terminal(retry, WAIT).await.expect("wait");
    // Finished 10 days ago: kept by a 30-day sweep, gone with the 7-day default.
    let recent = run(json!({})).await;
    finish_days_ago(&db.pool, &[recent], 10).await;
    // A backlog of 1,200 old runs: more than two batches.
    let backlog = old_runs(&db.pool, 1200, 45).await;
    // Not finished, though created long ago: never deleted.
    let unfinished = engine
        .trigger(scripted::NAME, json!({"block": {"a": 1}}), TriggerOptions::default())
        .await
        .expect("trigger")
        .run_id;
    gate(unfinished).wait_entered().await;
    sqlx::query("UPDATE runs SET created_at = now() - interval '90 days' WHERE id = $1")
        .bind(unfinished)
        .execute(&db.pool)
        .await
        .expect("backdate");
    // An old run another transaction holds locked: skipped, not waited for.
    let locked = old_runs(&db.pool, 1, 50).await[0];
    let mut holder = db.pool.begin().await.expect("tx");
    sqlx::query("SELECT 1 FROM runs WHERE id = $1 FOR UPDATE")
        .bind(locked)
        .execute(&mut *holder)
        .await
        .expect("lock");

    let output = sweep(&engine, json!({"older_than": "30d"})).await;
    assert_eq!(output["deleted"], json!(4 + 1200));
    assert_eq!(output["older_than"], "30days");
    holder.rollback().await.expect("unlock");

    let gone: Vec<Uuid> = old.iter().chain(&backlog).copied().collect();
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM runs").await,
        // retry, recent, unfinished, locked, and the sweep itself
        5
    );
    for table in ["runs", "run_steps", "run_events"] {
        let column = if table == "runs" { "id" } else { "run_id" };
        let left: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM {table} WHERE {column} = ANY($1)"
        )))
        .bind(&gone)
        .fetch_one(&db.pool)
        .await
        .expect("count");
        assert_eq!(left, 0, "{table} keeps rows of deleted runs");
    }
    for kept in [retry, recent, unfinished, locked] {
        let detail = engine.run(kept).await.expect("run").expect("kept");
        assert!(!detail.steps.is_empty());
        assert!(!engine.events(kept).await.expect("events").expect("kept").is_empty());
    }
    assert_eq!(engine.run(retry).await.expect("run").expect("kept").run.retry_of, None);

    // The configured default (7 days here) when the input gives none.
    let output = sweep(&engine, json!({})).await;
    assert_eq!(
        output["deleted"],
        json!(2),
        "the 10-day-old run and the unlocked old one"
    );
    assert!(engine.run(recent).await.expect("run").is_none());
    assert!(engine.run(locked).await.expect("run").is_none());
    assert!(engine.run(unfinished).await.expect("run").is_some());

    // A bad period is refused before anything is written.
    let runs_before = count(&db.pool, "SELECT count(*) FROM runs").await;
    let refused = engine
        .trigger(
            retention::NAME,
            json!({"older_than": "soon"}),
            TriggerOptions::default(),
        )
        .await;
    assert!(matches!(refused, Err(EngineError::InvalidInput(ref e)) if e.field == "older_than"));
    assert_eq!(count(&db.pool, "SELECT count(*) FROM runs").await, runs_before);

    gate(unfinished).release();
    engine.wait_for_terminal(unfinished, WAIT).await.expect("wait");
    worker.shutdown().await;
}

#[tokio::test]
async fn a_swept_run_leaves_its_schedule_consistent() {
    let db = test_db().await;
    let clock = manual_clock();
    let engine = engine_at(&db.pool, "n", Some(Arc::clone(&clock)));
    engine
        .create_schedule(spec("nightly", "* * * * *", Overlap::Skip, CatchUp::None))
        .await
        .expect("create");
    let fired = engine.fire_schedule("nightly", "ops").await.expect("fire");
    sqlx::query(
        "UPDATE runs SET status = 'completed', ready_at = NULL, finished_at = now() - interval '40 days' WHERE id = $1",
    )
    .bind(fired.run_id)
    .execute(&db.pool)
    .await
    .expect("finish");
    assert_eq!(
        engine
            .delete_finished_runs(Utc::now() - chrono::Duration::days(30), 10)
            .await
            .expect("sweep"),
        1
    );
    let view = engine.schedule("nightly").await.expect("read").expect("exists");
    assert!(view.recent_runs.is_empty(), "the fire went with its run");
    // Nothing in flight any more: skip allows the next.
    engine.fire_schedule("nightly", "ops").await.expect("fire again");
}
