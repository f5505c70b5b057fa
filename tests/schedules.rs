//! Cron schedules against a real PostgreSQL: ticks fire exactly once across instances, missed
//! ticks follow the catch-up policy, the overlap policy holds, disabling or deleting stops a
//! schedule, the retention sweep deletes exactly what it should, and the API refuses bad
//! input writing nothing. Time is a manual clock: no test waits for a real minute.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::scripted::{self, gate};
use common::server::{self, TestServer, read};
use common::{eventually, fast_config, test_db};
use reqwest::{Method, StatusCode};
use sagaflow::engine::scheduler::{
    CatchUp, CatchUpRules, Origin, Overlap, ScheduleError, ScheduleListing, ScheduleSpec, ScheduleView,
    SchedulerConfig, tick_key,
};
use sagaflow::engine::{Engine, EngineError, Faults, ManualClock, RunStatus, Trigger, TriggerOptions};
use sagaflow::server::{ScheduleSettings, ServeError, build_engine, declare_schedules};
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
        .register(retention::workflow(retention::Retention {
            default_period: Duration::from_secs(7 * 24 * 3600),
            ..Default::default()
        }));
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
    a.create_schedule(
        spec("every-second", "* * * * * *", Overlap::Allow, CatchUp::None),
        "ops",
    )
    .await
    .expect("create");
    eventually(WAIT, "four ticks", || async {
        (fired_ticks(&db.pool, "every-second").await.len() >= 4).then_some(())
    })
    .await;
    b.delete_schedule("every-second", "ops").await.expect("delete");
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
        .create_schedule(spec("shared", "* * * * * *", Overlap::Allow, CatchUp::None), "ops")
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
            .create_schedule(spec(name, "* * * * *", Overlap::Allow, CatchUp::None), "ops")
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
            .create_schedule(spec(name, "* * * * *", Overlap::Allow, policy), "ops")
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
        engine.create_schedule(spec, "ops").await.expect("create");
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
            .create_schedule(spec(name, "* * * * *", Overlap::Allow, CatchUp::All), "ops")
            .await
            .expect("create");
    }
    let scheduler = engine.start_scheduler(scheduler_config()).await.expect("scheduler");
    clock.set(t("2030-01-01T00:01:00Z"));
    wait_next_fire(&engine, &["sentinel", "target"], "2030-01-01T00:02:00Z").await;
    assert_eq!(fired_ticks(&db.pool, "target").await, ["2030-01-01T00:01:00Z"]);

    let disabled = engine
        .set_schedule_enabled("target", false, "ops")
        .await
        .expect("disable");
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
    let enabled = engine
        .set_schedule_enabled("target", true, "ops")
        .await
        .expect("enable");
    assert_eq!(enabled.schedule.next_fire_at, Some(t("2030-01-01T00:04:00Z")));
    assert_eq!(enabled.upcoming.len(), 5);
    clock.set(t("2030-01-01T00:04:00Z"));
    wait_next_fire(&engine, &["sentinel", "target"], "2030-01-01T00:05:00Z").await;
    assert_eq!(
        fired_ticks(&db.pool, "target").await,
        ["2030-01-01T00:01:00Z", "2030-01-01T00:04:00Z"]
    );

    engine.delete_schedule("target", "ops").await.expect("delete");
    assert!(engine.schedule("target").await.expect("read").is_none());
    assert!(matches!(
        engine.delete_schedule("target", "ops").await,
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
        .create_schedule(spec("orphan", "* * * * *", Overlap::Allow, CatchUp::None), "ops")
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
        .create_schedule(spec("legacy", "* * * * *", Overlap::Allow, CatchUp::None), "ops")
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
        engine.set_schedule_enabled("legacy", true, "ops").await,
        Err(ScheduleError::Expression(_))
    ));
    let off = engine
        .set_schedule_enabled("legacy", false, "ops")
        .await
        .expect("disable");
    assert!(!off.schedule.enabled);
}

#[tokio::test]
async fn two_creates_racing_for_a_name_make_one_schedule() {
    let db = test_db().await;
    let engine = engine_at(&db.pool, "n", Some(manual_clock()));
    let make = || engine.create_schedule(spec("contested", "@daily", Overlap::Skip, CatchUp::Latest), "ops");
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
    assert_eq!(output["older_than"], "30d", "echoed as given");
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
        .create_schedule(spec("nightly", "* * * * *", Overlap::Skip, CatchUp::None), "ops")
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

// ---------------------------------------------------------------------------------------
// Declared schedules
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn declared_schedules_are_upserted_and_the_builtin_sweep_is_created_once() {
    let db = test_db().await;
    let dir = std::env::temp_dir().join(format!("sagaflow-schedules-{}", Uuid::now_v7()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("schedules.json");
    let declare = |text: &str| {
        std::fs::write(&file, text).expect("write");
        let settings = ScheduleSettings {
            file: Some(file.clone()),
            ..ScheduleSettings::default()
        };
        let pool = db.pool.clone();
        async move {
            let engine = build_engine(pool, fast_config("n"), Faults::none(), &settings).expect("engine");
            let result = declare_schedules(&engine, &settings).await;
            (engine, result)
        }
    };

    let (engine, result) = declare(
        r#"{"schedules": [{"name": "report", "expression": "0 6 * * 1-5", "time_zone": "Europe/Paris",
                            "workflow": "retention-sweep", "input": {"older_than": "90d"}}]}"#,
    )
    .await;
    result.expect("declared");
    let report = engine.schedule("report").await.expect("read").expect("declared");
    assert_eq!(report.schedule.origin, Origin::File);
    assert_eq!(report.description, "at 06:00 on Monday to Friday (Europe/Paris)");
    let sweep = engine.schedule(retention::NAME).await.expect("read").expect("built in");
    assert_eq!(sweep.schedule.origin, Origin::Builtin);
    assert_eq!(sweep.schedule.expression, retention::DEFAULT_EXPRESSION);

    // An operator changes both; the next start re-declares the file's and keeps theirs.
    engine
        .set_schedule_enabled("report", false, "ops")
        .await
        .expect("disable");
    engine
        .set_schedule_enabled(retention::NAME, false, "ops")
        .await
        .expect("disable");
    let (engine, result) = declare(
        r#"{"schedules": [{"name": "report", "expression": "0 7 * * 1-5", "time_zone": "Europe/Paris",
                            "workflow": "retention-sweep"}]}"#,
    )
    .await;
    result.expect("declared again");
    let report = engine.schedule("report").await.expect("read").expect("declared");
    assert!(report.schedule.enabled);
    assert_eq!(report.schedule.expression, "0 7 * * 1-5");
    assert_eq!(report.schedule.input, json!({}));
    assert!(
        !engine
            .schedule(retention::NAME)
            .await
            .expect("read")
            .expect("kept")
            .schedule
            .enabled
    );

    // A bad file stops the start, naming the schedule and what is wrong.
    let (_, result) =
        declare(r#"{"schedules": [{"name": "bad", "expression": "0 6 * * *", "workflow": "nope"}]}"#).await;
    match result {
        Err(ServeError::Schedules { message, .. }) => assert!(message.contains("unknown workflow `nope`"), "{message}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    let (_, result) = declare(r#"{"schedules": [{"name": "bad", "expression": 6}]}"#).await;
    match result {
        Err(ServeError::Schedules { message, .. }) => assert!(message.contains("schedules[0].expression"), "{message}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(engine.schedule("bad").await.expect("read").is_none());
    let missing = ScheduleSettings {
        file: Some(dir.join("missing.json")),
        ..ScheduleSettings::default()
    };
    match declare_schedules(&engine, &missing).await {
        Err(ServeError::Schedules { file, .. }) => assert_eq!(file, dir.join("missing.json")),
        other => panic!("expected a refusal, got {other:?}"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn listings_page_by_name_and_read_each_schedules_own_latest_runs() {
    let db = test_db().await;
    let clock = manual_clock();
    // No worker: the runs stay pending, which `allow` does not mind.
    let engine = engine_at(&db.pool, "n", Some(Arc::clone(&clock)));
    let fires = [("alpha", 12), ("beta.sweep", 3), ("gamma", 0), ("zeta", 1)];
    for (name, _) in fires {
        engine
            .create_schedule(spec(name, "0 3 * * *", Overlap::Allow, CatchUp::None), "ops")
            .await
            .expect("create");
    }
    // Interleaved, so that no schedule's runs are contiguous in the table.
    for round in 0..12 {
        for (name, times) in fires {
            if round < times {
                clock.advance(Duration::from_secs(1));
                engine.fire_schedule(name, &format!("op-{round}")).await.expect("fire");
            }
        }
    }

    // Each schedule's latest runs, read for all together, are what reading it alone gives.
    let all = engine.schedules().await.expect("schedules");
    let names: Vec<&str> = all.iter().map(|v| v.schedule.name.as_str()).collect();
    assert_eq!(names, ["alpha", "beta.sweep", "gamma", "zeta"], "by name");
    for view in &all {
        let alone: Vec<Uuid> = engine
            .schedule_runs(&view.schedule.name, 10)
            .await
            .expect("runs")
            .iter()
            .map(|f| f.run_id)
            .collect();
        let together: Vec<Uuid> = view.recent_runs.iter().map(|f| f.run_id).collect();
        assert_eq!(together, alone, "{}", view.schedule.name);
        let expected = fires.iter().find(|(n, _)| *n == view.schedule.name).map_or(0, |f| f.1);
        assert_eq!(together.len(), expected.min(10), "{}", view.schedule.name);
        assert!(
            view.recent_runs.windows(2).all(|w| w[0].tick > w[1].tick),
            "newest first"
        );
    }
    let alpha = &all[0];
    assert_eq!(alpha.recent_runs[0].fired_by, "op-11");
    assert_eq!(alpha.upcoming.len(), 5);

    // Pages: after a name, at most a limit, a few latest runs each.
    let listing = |contains: Option<&str>, after: Option<&str>, limit: i64| ScheduleListing {
        contains: contains.map(str::to_string),
        after: after.map(str::to_string),
        limit,
        recent: 3,
    };
    let names_of = |views: &[ScheduleView]| views.iter().map(|v| v.schedule.name.clone()).collect::<Vec<_>>();
    let first = engine.list_schedules(&listing(None, None, 2)).await.expect("page");
    assert_eq!(names_of(&first), ["alpha", "beta.sweep"]);
    assert_eq!(first[0].recent_runs.len(), 3);
    assert_eq!(first[0].recent_runs[0].fired_by, "op-11");
    let second = engine
        .list_schedules(&listing(None, Some("beta.sweep"), 2))
        .await
        .expect("page");
    assert_eq!(names_of(&second), ["gamma", "zeta"]);
    assert!(
        engine
            .list_schedules(&listing(None, Some("zeta"), 2))
            .await
            .expect("page")
            .is_empty()
    );
    // Searched in names and workflows, ignoring case, as text (`_` is no wildcard).
    let found = engine
        .list_schedules(&listing(Some("BETA."), None, 10))
        .await
        .expect("search");
    assert_eq!(names_of(&found), ["beta.sweep"]);
    let found = engine
        .list_schedules(&listing(Some("SCRIPT"), Some("beta.sweep"), 10))
        .await
        .expect("search");
    assert_eq!(names_of(&found), ["gamma", "zeta"], "by workflow");
    assert!(
        engine
            .list_schedules(&listing(Some("_"), None, 10))
            .await
            .expect("search")
            .is_empty()
    );
    assert!(
        engine
            .list_schedules(&listing(None, None, 0))
            .await
            .expect("empty")
            .is_empty()
    );
}

// ---------------------------------------------------------------------------------------
// The API
// ---------------------------------------------------------------------------------------

async fn start_server(clock: &Arc<ManualClock>, run_worker: bool) -> TestServer {
    let clock = Arc::clone(clock);
    server::start_with(move |config| {
        config.run_worker = run_worker;
        config.schedules.clock = clock;
        config.schedules.scheduler = scheduler_config();
    })
    .await
}

async fn schedule_rows(server: &TestServer) -> (i64, i64, i64) {
    (
        count(server.pool(), "SELECT count(*) FROM schedules").await,
        count(server.pool(), "SELECT count(*) FROM schedule_fires").await,
        count(server.pool(), "SELECT count(*) FROM runs").await,
    )
}

#[tokio::test]
async fn schedules_over_the_api_from_creation_to_deletion() {
    let clock = manual_clock();
    let server = start_server(&clock, true).await;
    let body = json!({
        "name": "sweep-often", "expression": "*/15 * * * *", "time_zone": "America/New_York",
        "workflow": "retention-sweep", "input": {"older_than": "90d"}, "catch_up": "none"
    });
    let response = server
        .admin(Method::POST, "/v1/schedules")
        .json(&body)
        .send()
        .await
        .expect("create");
    let location = response.headers().get("location").cloned();
    let (status, created) = read(response).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(
        location.and_then(|l| l.to_str().ok().map(str::to_string)).as_deref(),
        Some("/v1/schedules/sweep-often")
    );
    assert_eq!(created["description"], "every 15 minutes (America/New_York)");
    assert_eq!(created["overlap"], "skip");
    assert_eq!(created["catch_up"], "none");
    assert_eq!(created["origin"], "api");
    assert_eq!(created["next_fire_at"], "2030-01-01T00:15:00Z");
    assert_eq!(
        created["upcoming"],
        json!([
            "2030-01-01T00:15:00Z",
            "2030-01-01T00:30:00Z",
            "2030-01-01T00:45:00Z",
            "2030-01-01T01:00:00Z",
            "2030-01-01T01:15:00Z"
        ])
    );

    // The tick fires on its own; the run shows in the schedule's recent runs with its status.
    clock.set(t("2030-01-01T00:15:00Z"));
    let run_id = eventually(WAIT, "the tick's run", || async {
        let (_, s) = read(
            server
                .api(Method::GET, "/v1/schedules/sweep-often")
                .send()
                .await
                .expect("get"),
        )
        .await;
        s["recent_runs"][0]["run_id"].as_str().map(str::to_string)
    })
    .await;
    let run = server.wait_terminal(&run_id).await;
    assert_eq!(run["trigger"], "schedule");
    assert_eq!(run["idempotency_key"], "schedule:sweep-often:2030-01-01T00:15:00Z");
    assert_eq!(run["status"], "completed");
    let (_, listed) = read(server.api(Method::GET, "/v1/schedules").send().await.expect("list")).await;
    let names: Vec<&str> = listed["schedules"]
        .as_array()
        .expect("schedules")
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(names, ["retention-sweep", "sweep-often"]);
    let mine = &listed["schedules"][1];
    assert_eq!(mine["recent_runs"][0]["status"], "completed");
    assert_eq!(mine["recent_runs"][0]["tick"], "2030-01-01T00:15:00Z");
    assert_eq!(mine["last_run_id"], json!(run_id));

    // Replace: the input alone keeps the next tick; a new expression moves it.
    let (status, replaced) = read(
        server
            .admin(Method::PUT, "/v1/schedules/sweep-often")
            .json(&json!({"expression": "*/15 * * * *", "time_zone": "America/New_York",
                          "workflow": "retention-sweep", "input": {"older_than": "60d"}, "catch_up": "none"}))
            .send()
            .await
            .expect("put"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{replaced}");
    assert_eq!(replaced["input"], json!({"older_than": "60d"}));
    assert_eq!(replaced["next_fire_at"], "2030-01-01T00:30:00Z");
    let (status, replaced) = read(
        server
            .admin(Method::PUT, "/v1/schedules/sweep-often")
            .json(
                &json!({"name": "sweep-often", "expression": "0 9 * * *", "time_zone": "America/New_York",
                          "workflow": "retention-sweep"}),
            )
            .send()
            .await
            .expect("put"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{replaced}");
    assert_eq!(replaced["next_fire_at"], "2030-01-01T14:00:00Z");
    assert_eq!(replaced["description"], "at 09:00 every day (America/New_York)");

    // Disable, enable, fire now.
    let (status, disabled) = read(
        server
            .admin(Method::POST, "/v1/schedules/sweep-often/disable")
            .send()
            .await
            .expect("disable"),
    )
    .await;
    assert_eq!(
        (status, &disabled["enabled"], &disabled["upcoming"]),
        (StatusCode::OK, &json!(false), &json!([]))
    );
    let (status, enabled) = read(
        server
            .admin(Method::POST, "/v1/schedules/sweep-often/enable")
            .send()
            .await
            .expect("enable"),
    )
    .await;
    assert_eq!((status, &enabled["enabled"]), (StatusCode::OK, &json!(true)));
    let response = server
        .admin(Method::POST, "/v1/schedules/sweep-often/fire")
        .header("X-Sagaflow-Operator", "grace@example.com")
        .send()
        .await
        .expect("fire");
    let (status, fired) = read(response).await;
    assert_eq!(status, StatusCode::CREATED, "{fired}");
    assert_eq!(fired["trigger"], "schedule");
    assert!(
        fired["idempotency_key"]
            .as_str()
            .is_some_and(|k| k.starts_with("schedule:sweep-often:manual:"))
    );
    server.wait_terminal(fired["id"].as_str().expect("id")).await;
    let (_, view) = read(
        server
            .api(Method::GET, "/v1/schedules/sweep-often")
            .send()
            .await
            .expect("get"),
    )
    .await;
    assert_eq!(view["recent_runs"][0]["manual"], true);
    assert_eq!(view["recent_runs"][0]["fired_by"], "grace@example.com");

    let (status, _) = read(
        server
            .admin(Method::DELETE, "/v1/schedules/sweep-often")
            .send()
            .await
            .expect("delete"),
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, gone) = read(
        server
            .api(Method::GET, "/v1/schedules/sweep-often")
            .send()
            .await
            .expect("get"),
    )
    .await;
    assert_eq!(
        (status, &gone["error"]["code"]),
        (StatusCode::NOT_FOUND, &json!("not_found"))
    );
    server.stop().await;
}

#[tokio::test]
async fn bad_schedule_requests_are_refused_and_write_nothing() {
    let clock = manual_clock();
    // No worker: runs stay pending, so a fire-now stays in flight.
    let server = start_server(&clock, false).await;
    let good = json!({"name": "nightly", "expression": "0 3 * * *", "workflow": "retention-sweep"});
    let (status, _) = read(
        server
            .admin(Method::POST, "/v1/schedules")
            .json(&good)
            .send()
            .await
            .expect("create"),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, _) = read(
        server
            .admin(Method::POST, "/v1/schedules/nightly/fire")
            .send()
            .await
            .expect("fire"),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let before = schedule_rows(&server).await;

    let with = |patch: Value| {
        let mut body = good.clone();
        if let (Some(body), Some(patch)) = (body.as_object_mut(), patch.as_object()) {
            for (k, v) in patch {
                body.insert(k.clone(), v.clone());
            }
        }
        body
    };
    struct Case {
        name: &'static str,
        request: reqwest::RequestBuilder,
        status: StatusCode,
        code: &'static str,
        field: Option<&'static str>,
        says: &'static str,
    }
    let post = |body: Value| server.admin(Method::POST, "/v1/schedules").json(&body);
    let cases = vec![
        Case {
            name: "invalid expression",
            request: post(with(json!({"name": "x", "expression": "61 * * * *"}))),
            status: StatusCode::UNPROCESSABLE_ENTITY,
            code: "invalid_input",
            field: Some("expression"),
            says: "the minute field is 61, outside 0 to 59",
        },
        Case {
            name: "wrong number of fields",
            request: post(with(json!({"name": "x", "expression": "* * *"}))),
            status: StatusCode::UNPROCESSABLE_ENTITY,
            code: "invalid_input",
            field: Some("expression"),
            says: "got 3",
        },
        Case {
            name: "never fires",
            request: post(with(json!({"name": "x", "expression": "0 0 30 2 *"}))),
            status: StatusCode::UNPROCESSABLE_ENTITY,
            code: "invalid_input",
            field: Some("expression"),
            says: "never fires",
        },
        Case {
            name: "invalid time zone",
            request: post(with(json!({"name": "x", "time_zone": "Mars/Olympus_Mons"}))),
            status: StatusCode::UNPROCESSABLE_ENTITY,
            code: "invalid_input",
            field: Some("time_zone"),
            says: "failed to parse timezone",
        },
        Case {
            name: "unknown workflow",
            request: post(with(json!({"name": "x", "workflow": "no-such-workflow"}))),
            status: StatusCode::UNPROCESSABLE_ENTITY,
            code: "invalid_input",
            field: Some("workflow"),
            says: "unknown workflow",
        },
        Case {
            name: "input the workflow refuses",
            request: post(with(json!({"name": "x", "input": {"older_than": "soon"}}))),
            status: StatusCode::UNPROCESSABLE_ENTITY,
            code: "invalid_input",
            field: Some("input.older_than"),
            says: "not a duration",
        },
        Case {
            name: "invalid name",
            request: post(with(json!({"name": "has space"}))),
            status: StatusCode::UNPROCESSABLE_ENTITY,
            code: "invalid_input",
            field: Some("name"),
            says: "invalid schedule name",
        },
        Case {
            name: "missing expression",
            request: post(json!({"name": "x", "workflow": "retention-sweep"})),
            status: StatusCode::UNPROCESSABLE_ENTITY,
            code: "invalid_input",
            field: Some("expression"),
            says: "missing field",
        },
        Case {
            name: "unknown policy",
            request: post(with(json!({"name": "x", "overlap": "sometimes"}))),
            status: StatusCode::UNPROCESSABLE_ENTITY,
            code: "invalid_input",
            field: Some("overlap"),
            says: "unknown variant",
        },
        Case {
            name: "duplicate name",
            request: post(good.clone()),
            status: StatusCode::CONFLICT,
            code: "duplicate",
            field: None,
            says: "already exists",
        },
        Case {
            name: "malformed JSON",
            request: server
                .admin(Method::POST, "/v1/schedules")
                .header("content-type", "application/json")
                .body("{"),
            status: StatusCode::BAD_REQUEST,
            code: "malformed_json",
            field: None,
            says: "",
        },
        Case {
            name: "the API token cannot create",
            request: server
                .api(Method::POST, "/v1/schedules")
                .json(&with(json!({"name": "x"}))),
            status: StatusCode::FORBIDDEN,
            code: "forbidden",
            field: None,
            says: "",
        },
        Case {
            name: "no token",
            request: server.client.get(server.url("/v1/schedules")),
            status: StatusCode::UNAUTHORIZED,
            code: "unauthorized",
            field: None,
            says: "",
        },
        Case {
            name: "replace an unknown schedule",
            request: server
                .admin(Method::PUT, "/v1/schedules/ghost")
                .json(&with(json!({"name": "ghost"}))),
            status: StatusCode::NOT_FOUND,
            code: "not_found",
            field: None,
            says: "schedule `ghost`",
        },
        Case {
            name: "replace naming another schedule",
            request: server
                .admin(Method::PUT, "/v1/schedules/nightly")
                .json(&with(json!({"name": "other"}))),
            status: StatusCode::UNPROCESSABLE_ENTITY,
            code: "invalid_input",
            field: Some("name"),
            says: "the path names `nightly`",
        },
        Case {
            name: "replace with a bad expression",
            request: server
                .admin(Method::PUT, "/v1/schedules/nightly")
                .json(&with(json!({"expression": "@fortnightly"}))),
            status: StatusCode::UNPROCESSABLE_ENTITY,
            code: "invalid_input",
            field: Some("expression"),
            says: "unknown shorthand",
        },
        Case {
            name: "read an unknown schedule",
            request: server.api(Method::GET, "/v1/schedules/ghost"),
            status: StatusCode::NOT_FOUND,
            code: "not_found",
            field: None,
            says: "",
        },
        Case {
            name: "a name no schedule can have",
            request: server.api(Method::GET, "/v1/schedules/bad%00name"),
            status: StatusCode::NOT_FOUND,
            code: "not_found",
            field: None,
            says: "",
        },
        Case {
            name: "replace under a name no schedule can have",
            request: server.admin(Method::PUT, "/v1/schedules/%20x").json(&good),
            status: StatusCode::NOT_FOUND,
            code: "not_found",
            field: None,
            says: "",
        },
        Case {
            name: "delete an unknown schedule",
            request: server.admin(Method::DELETE, "/v1/schedules/ghost"),
            status: StatusCode::NOT_FOUND,
            code: "not_found",
            field: None,
            says: "",
        },
        Case {
            name: "the API token cannot delete",
            request: server.api(Method::DELETE, "/v1/schedules/nightly"),
            status: StatusCode::FORBIDDEN,
            code: "forbidden",
            field: None,
            says: "",
        },
        Case {
            name: "enable an unknown schedule",
            request: server.admin(Method::POST, "/v1/schedules/ghost/enable"),
            status: StatusCode::NOT_FOUND,
            code: "not_found",
            field: None,
            says: "",
        },
        Case {
            name: "disable an unknown schedule",
            request: server.admin(Method::POST, "/v1/schedules/ghost/disable"),
            status: StatusCode::NOT_FOUND,
            code: "not_found",
            field: None,
            says: "",
        },
        Case {
            name: "fire an unknown schedule",
            request: server.admin(Method::POST, "/v1/schedules/ghost/fire"),
            status: StatusCode::NOT_FOUND,
            code: "not_found",
            field: None,
            says: "",
        },
        Case {
            name: "fire while a run is in flight (skip)",
            request: server.admin(Method::POST, "/v1/schedules/nightly/fire"),
            status: StatusCode::CONFLICT,
            code: "in_flight",
            field: None,
            says: "still in flight",
        },
        Case {
            name: "the API token cannot fire",
            request: server.api(Method::POST, "/v1/schedules/nightly/fire"),
            status: StatusCode::FORBIDDEN,
            code: "forbidden",
            field: None,
            says: "",
        },
    ];
    for case in cases {
        let (status, body) = read(case.request.send().await.expect("request")).await;
        assert_eq!(status, case.status, "{}: {body}", case.name);
        assert_eq!(body["error"]["code"], case.code, "{}: {body}", case.name);
        if let Some(field) = case.field {
            assert_eq!(body["error"]["field"], field, "{}: {body}", case.name);
        }
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(case.says), "{}: {message}", case.name);
        assert_eq!(schedule_rows(&server).await, before, "{} wrote something", case.name);
    }
    let (_, nightly) = read(
        server
            .api(Method::GET, "/v1/schedules/nightly")
            .send()
            .await
            .expect("get"),
    )
    .await;
    assert_eq!(nightly["expression"], "0 3 * * *", "refused replaces changed nothing");
    server.stop().await;
}

#[tokio::test]
async fn the_openapi_document_describes_the_schedule_routes() {
    let server = server::start().await;
    let (_, spec) = read(
        server
            .client
            .get(server.url("/openapi.json"))
            .send()
            .await
            .expect("spec"),
    )
    .await;
    let paths: HashSet<String> = spec["paths"].as_object().expect("paths").keys().cloned().collect();
    for path in [
        "/v1/schedules",
        "/v1/schedules/{name}",
        "/v1/schedules/{name}/enable",
        "/v1/schedules/{name}/disable",
        "/v1/schedules/{name}/fire",
    ] {
        assert!(paths.contains(path), "the spec lacks {path}");
    }
    let create = &spec["paths"]["/v1/schedules"]["post"]["responses"];
    for code in ["201", "400", "401", "403", "409", "413", "422"] {
        assert!(
            create.get(code).is_some(),
            "POST /v1/schedules does not document {code}"
        );
    }
    for method in ["get", "put", "delete"] {
        assert!(
            spec["paths"]["/v1/schedules/{name}"][method]["responses"]
                .get("404")
                .is_some()
        );
    }
    server.stop().await;
}
