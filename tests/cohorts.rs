//! Cohorts: waiting triggers' registrations that arrive together go through their steps in
//! lockstep, one batch call per step, and commit together (`engine::executor::cohort`).
//! Each test gathers its cohort on purpose (`cohort_gather`, one runner, no lanes) so that
//! what is under test is certain to be a cohort; which runs shared one is read from the
//! database (the transaction that wrote each run, `xmin`).

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{fast_config, test_db};
use sagaflow::engine::{Engine, EngineConfig, RunStatus, TriggerOptions, WorkerHandle};
use sagaflow::workflows::customer_account::{self, messages};
use serde_json::{Value, json};
use sqlx::PgPool;

/// An engine running the registration whose waiting triggers' runs start here: with
/// `cohorts`, one runner that gathers what arrives within a generous window; without, every
/// run on its own. No lanes either way, so that runs sharing a transaction shared a cohort.
async fn registering_engine(pool: &PgPool, cohorts: bool) -> (Engine, WorkerHandle) {
    let engine = Engine::builder(pool.clone())
        .config(EngineConfig {
            max_concurrent_runs: 64,
            commit_lanes: 0,
            cohort_runners: usize::from(cohorts),
            cohort_gather: Duration::from_millis(if cohorts { 400 } else { 0 }),
            // One node name for both: it is in the log (`run_claimed`), which the tests compare.
            ..fast_config("registrations")
        })
        .register(customer_account::workflow())
        .build()
        .expect("engine");
    let worker = engine.start_worker().await.expect("worker");
    (engine, worker)
}

/// A registration's input.
fn registration(identity: &str, email: &str) -> Value {
    json!({
        "authIdentityId": identity,
        "customerData": {"email": email, "first_name": "Ada", "metadata": {"n": email}}
    })
}

/// Creates identities `authid_<prefix><i>` for i in `0..count` in `pool`: the same ids in
/// every database, so that one input means the same registration in each.
async fn identities(pool: &PgPool, prefix: &str, count: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..count {
        let id = format!("authid_{prefix}{i}");
        sqlx::query("INSERT INTO auth_identities (id, provider, entity_id) VALUES ($1, 'emailpass', $1)")
            .bind(&id)
            .execute(pool)
            .await
            .expect("identity");
        ids.push(id);
    }
    ids
}

/// `value` with every non-null field named `…_at` (a time, which differs between databases)
/// replaced by a marker.
fn without_times(value: Value) -> Value {
    match value {
        Value::Object(fields) => Value::Object(
            fields
                .into_iter()
                .map(|(k, v)| {
                    let v = if k.ends_with("_at") && !v.is_null() {
                        json!("<time>")
                    } else {
                        without_times(v)
                    };
                    (k, v)
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.into_iter().map(without_times).collect()),
        other => other,
    }
}

/// Triggers every registration at once, each waiting for its run: the answers, in order.
async fn register_together(engine: &Engine, inputs: &[Value]) -> Vec<sagaflow::engine::Waited> {
    let waits = inputs.iter().map(|input| {
        engine.trigger_and_wait(
            customer_account::NAME,
            input.clone(),
            TriggerOptions::default(),
            Duration::from_secs(20),
        )
    });
    futures::future::join_all(waits)
        .await
        .into_iter()
        .map(|answer| answer.expect("every trigger is answered"))
        .collect()
}

/// How many distinct transactions wrote the runs' rows (a cohort writes all of its in one).
async fn writing_transactions(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(DISTINCT xmin::text) FROM runs")
        .fetch_one(pool)
        .await
        .expect("count")
}

/// A run as [`facts`] reads it: id, input, status, output, error.
type RunFacts = (uuid::Uuid, Value, String, Option<Value>, Option<Value>);

/// Everything a registration left, by email, with the ids that differ between databases
/// (customers', events', runs') replaced by what they must equal: the customer's id where it
/// is the run's customer, the event's where it is the run's event. Panics where an id is not
/// what it must be (a link to another customer, an event of another run).
async fn facts(pool: &PgPool) -> BTreeMap<String, Value> {
    let runs: Vec<RunFacts> = sqlx::query_as("SELECT id, input, status::text, output, error FROM runs ORDER BY id")
        .fetch_all(pool)
        .await
        .expect("runs");
    let mut all = BTreeMap::new();
    for (run, input, status, output, error) in runs {
        let email = input["customerData"]["email"].as_str().expect("an email").to_string();
        let identity = input["authIdentityId"].as_str().expect("an identity").to_string();
        let customer: Option<(String, bool, Value, Option<uuid::Uuid>)> = sqlx::query_as(
            "SELECT id, has_account, metadata, created_by_run FROM customers WHERE email = $1 AND created_by_run = $2",
        )
        .bind(&email)
        .bind(run)
        .fetch_optional(pool)
        .await
        .expect("customer");
        let customer_id = customer.as_ref().map(|c| c.0.clone()).unwrap_or_default();
        let events: Vec<(String, String, Value)> =
            sqlx::query_as("SELECT id, status::text, data FROM outbox_events WHERE run_id = $1 ORDER BY id")
                .bind(run)
                .fetch_all(pool)
                .await
                .expect("events");
        let event_id = events.first().map(|e| e.0.clone()).unwrap_or_default();
        let link: Option<Value> = sqlx::query_scalar("SELECT app_metadata FROM auth_identities WHERE id = $1")
            .bind(&identity)
            .fetch_optional(pool)
            .await
            .expect("identity");
        // Whole rows, every column but the run's id (times are compared by `without_times`).
        let rows = |sql: &'static str| {
            let pool = pool.clone();
            async move {
                sqlx::query_scalar::<_, Value>(sql)
                    .bind(run)
                    .fetch_all(&pool)
                    .await
                    .expect("rows")
            }
        };
        let run_row = rows("SELECT to_jsonb(r) - 'id' FROM runs r WHERE id = $1").await;
        let steps = rows("SELECT to_jsonb(s) - 'run_id' FROM run_steps s WHERE run_id = $1 ORDER BY idx").await;
        // Entry times are checked by `assert_true_times`.
        let log = rows("SELECT to_jsonb(e) - 'run_id' - 'at' FROM run_events e WHERE run_id = $1 ORDER BY seq").await;
        let normalize = |value: Value| -> Value {
            let mut text = value.to_string();
            if !customer_id.is_empty() {
                text = text.replace(&customer_id, "<the run's customer>");
            }
            if !event_id.is_empty() {
                text = text.replace(&event_id, "<the run's event>");
            }
            without_times(serde_json::from_str(&text).expect("still JSON"))
        };
        let fact = json!({
            "status": status,
            "output": output,
            "error": error.map(|e| e["message"].clone()),
            "customer": customer.as_ref().map(|c| json!({"has_account": c.1, "metadata": c.2})),
            "events": events.iter().map(|e| json!([e.1, e.2])).collect::<Vec<_>>(),
            "identity": link,
            "run": run_row,
            "steps": steps,
            "log": log,
        });
        all.insert(email, normalize(fact));
    }
    all
}

/// `together` and `apart` hold the same registrations with the same facts; a difference is
/// reported by email and fact, not as two whole maps.
fn assert_same_facts(together: &BTreeMap<String, Value>, apart: &BTreeMap<String, Value>) {
    assert_eq!(
        together.keys().collect::<Vec<_>>(),
        apart.keys().collect::<Vec<_>>(),
        "the same registrations"
    );
    for (email, fact) in together {
        for (name, value) in fact.as_object().into_iter().flatten() {
            assert_eq!(value, &apart[email][name], "{email}: {name} differs");
        }
    }
}

/// The entries of a run are in time order and each step's times lie within its entries':
/// a cohort keeps the true time of each attempt and outcome.
async fn assert_true_times(pool: &PgPool) {
    let disordered: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (
             SELECT at < lag(at) OVER (PARTITION BY run_id ORDER BY seq) AS back FROM run_events
         ) e WHERE back",
    )
    .fetch_one(pool)
    .await
    .expect("count");
    assert_eq!(disordered, 0, "log entries out of time order");
    let steps_out_of_order: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM run_steps a JOIN run_steps b ON b.run_id = a.run_id AND b.idx = a.idx + 1
         WHERE a.finished_at > b.started_at OR a.started_at > a.finished_at",
    )
    .fetch_one(pool)
    .await
    .expect("count");
    assert_eq!(
        steps_out_of_order, 0,
        "a step started before the one before it finished"
    );
    let distinct_times: i64 =
        sqlx::query_scalar("SELECT count(DISTINCT at) FROM run_events WHERE kind::text = 'step_succeeded'")
            .fetch_one(pool)
            .await
            .expect("count");
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM runs")
        .fetch_one(pool)
        .await
        .expect("count");
    assert!(
        distinct_times > runs,
        "each outcome keeps its own time, not one time per run ({distinct_times} times, {runs} runs)"
    );
}

/// Registrations gathered into one cohort leave exactly what the same registrations leave run
/// one by one without cohorts: every run, step, entry, customer, link and event alike (ids
/// aside), each answer is the run as committed, and the times are true ones.
#[tokio::test]
async fn a_cohort_of_registrations_leaves_what_they_leave_one_by_one() {
    let together = test_db().await;
    let apart = test_db().await;
    let count = 6;
    let mut inputs = Vec::new();
    for db in [&together, &apart] {
        let ids = identities(&db.pool, "t", count).await;
        inputs = ids
            .iter()
            .enumerate()
            .map(|(i, id)| registration(id, &format!("reg{i}@example.com")))
            .collect();
    }
    let (engine, worker) = registering_engine(&together.pool, true).await;
    let answers = register_together(&engine, &inputs).await;
    for waited in &answers {
        let detail = waited.detail.clone().expect("the run");
        assert_eq!(detail.run.status, RunStatus::Completed);
        let read = engine
            .run(waited.triggered.run_id)
            .await
            .expect("read")
            .expect("the run");
        assert_eq!(detail, read, "the answer is the run as committed");
    }
    assert_eq!(
        writing_transactions(&together.pool).await,
        1,
        "one cohort wrote every run"
    );
    worker.shutdown().await;

    let (engine, worker) = registering_engine(&apart.pool, false).await;
    for input in &inputs {
        register_together(&engine, std::slice::from_ref(input)).await;
    }
    assert_eq!(
        writing_transactions(&apart.pool).await,
        count as i64,
        "each run on its own"
    );
    worker.shutdown().await;

    let (a, b) = (facts(&together.pool).await, facts(&apart.pool).await);
    assert_eq!(a.len(), count);
    assert_same_facts(&a, &b);
    assert_true_times(&together.pool).await;
}

/// A cohort one of whose runs fails (its identity is missing, or already linked) commits
/// nothing: it is rolled back and each of its runs goes on alone, so the failing runs fail as
/// they would without cohorts (one attempt, the same error) and their peers complete, each
/// step attempted once, and nothing of the cohort is left behind.
#[tokio::test]
async fn a_cohort_whose_run_fails_is_given_up_and_each_run_goes_on_alone() {
    let together = test_db().await;
    let apart = test_db().await;
    let mut inputs = Vec::new();
    for db in [&together, &apart] {
        let ids = identities(&db.pool, "p", 4).await;
        // The last identity is linked already.
        sqlx::query("UPDATE auth_identities SET app_metadata = '{\"customer_id\": \"cus_old\"}' WHERE id = $1")
            .bind(&ids[3])
            .execute(&db.pool)
            .await
            .expect("link");
        inputs = vec![
            registration(&ids[0], "p0@example.com"),
            registration("authid_missing", "missing@example.com"),
            registration(&ids[1], "p1@example.com"),
            registration(&ids[3], "linked@example.com"),
            registration(&ids[2], "p2@example.com"),
        ];
    }
    let (engine, worker) = registering_engine(&together.pool, true).await;
    let answers = register_together(&engine, &inputs).await;
    let statuses: Vec<RunStatus> = answers
        .iter()
        .map(|w| w.detail.as_ref().expect("the run").run.status)
        .collect();
    // A registration refused by its first step has nothing to undo: it ends compensated.
    use RunStatus::{Compensated, Completed};
    assert_eq!(statuses, [Completed, Compensated, Completed, Compensated, Completed]);
    assert_eq!(
        writing_transactions(&together.pool).await,
        inputs.len() as i64,
        "given up, every run committed on its own"
    );
    worker.shutdown().await;

    let (engine, worker) = registering_engine(&apart.pool, false).await;
    for input in &inputs {
        register_together(&engine, std::slice::from_ref(input)).await;
    }
    worker.shutdown().await;
    let (a, b) = (facts(&together.pool).await, facts(&apart.pool).await);
    assert_same_facts(&a, &b);
    assert_eq!(
        a["linked@example.com"]["error"],
        json!(messages::ALREADY_LINKED),
        "{:#}",
        a["linked@example.com"]
    );
    let attempts: Vec<i32> = sqlx::query_scalar("SELECT attempts FROM run_steps WHERE attempts > 0")
        .fetch_all(&together.pool)
        .await
        .expect("attempts");
    assert!(
        attempts.iter().all(|&n| n == 1),
        "each step attempted once: {attempts:?}"
    );
    let orphans: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM customers WHERE created_by_run NOT IN (SELECT id FROM runs WHERE status = 'completed'))
              + (SELECT count(*) FROM outbox_events WHERE status <> 'released')",
    )
    .fetch_one(&together.pool)
    .await
    .expect("count");
    assert_eq!(
        orphans, 0,
        "nothing of the given-up cohort or of the failed runs is left"
    );
}

/// Two registrations of one email arriving together never share a cohort: the second goes on
/// alone, beside the cohort of the others, and is refused as a duplicate once the first commits;
/// the others complete together.
#[tokio::test]
async fn registrations_of_one_email_never_share_a_cohort() {
    let db = test_db().await;
    let ids = identities(&db.pool, "s", 4).await;
    let inputs = vec![
        registration(&ids[0], "same@example.com"),
        registration(&ids[1], "other1@example.com"),
        registration(&ids[2], "SAME@example.com"),
        registration(&ids[3], "other2@example.com"),
    ];
    let (engine, worker) = registering_engine(&db.pool, true).await;
    let answers = register_together(&engine, &inputs).await;
    let runs: Vec<(uuid::Uuid, RunStatus, Option<String>)> = answers
        .iter()
        .map(|w| {
            let run = &w.detail.as_ref().expect("the run").run;
            let message = run
                .error
                .as_ref()
                .and_then(|e| e["message"].as_str())
                .map(str::to_string);
            (run.id, run.status, message)
        })
        .collect();
    let same: Vec<&(uuid::Uuid, RunStatus, Option<String>)> = [&runs[0], &runs[2]].into();
    let completed = same.iter().filter(|r| r.1 == RunStatus::Completed).count();
    assert_eq!(completed, 1, "one of the two registers the email: {runs:?}");
    let failed = same
        .iter()
        .find(|r| r.1 == RunStatus::Compensated)
        .expect("the other is refused");
    assert_eq!(failed.2.as_deref(), Some(messages::DUPLICATE_ACCOUNT));
    assert_eq!(runs[1].1, RunStatus::Completed);
    assert_eq!(runs[3].1, RunStatus::Completed);
    let xmin = |id: uuid::Uuid| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, String>("SELECT xmin::text FROM runs WHERE id = $1")
                .bind(id)
                .fetch_one(&pool)
                .await
                .expect("xmin")
        }
    };
    let (first, second) = (xmin(runs[0].0).await, xmin(runs[2].0).await);
    assert_ne!(first, second, "the two runs of one email were written together");
    let cohort = xmin(runs[1].0).await;
    assert_eq!(cohort, xmin(runs[3].0).await, "the others shared a cohort");
    let customers: i64 = sqlx::query_scalar("SELECT count(*) FROM customers WHERE email = 'same@example.com'")
        .fetch_one(&db.pool)
        .await
        .expect("count");
    assert_eq!(customers, 1);
    worker.shutdown().await;
}

/// What the batch form of [`Echo`] does, read from the first item's input `mode`.
struct Echo;

#[async_trait::async_trait]
impl sagaflow::engine::Step for Echo {
    type Output = Value;

    async fn invoke(&self, ctx: &mut sagaflow::engine::StepContext<'_>) -> Result<Value, sagaflow::engine::StepError> {
        let input: Value = ctx.input()?;
        Ok(input["n"].clone())
    }
}

#[async_trait::async_trait]
impl sagaflow::engine::BatchStep for Echo {
    async fn invoke_batch(
        &self,
        _db: &mut sqlx::PgConnection,
        items: &[sagaflow::engine::BatchItem<'_>],
    ) -> Result<Vec<Result<Value, sagaflow::engine::StepError>>, sagaflow::engine::StepError> {
        let inputs: Vec<Value> = items.iter().map(|i| i.input()).collect::<Result<_, _>>()?;
        let answers = || inputs.iter().map(|input| Ok(input["n"].clone())).collect::<Vec<_>>();
        match inputs[0]["mode"].as_str() {
            Some("panic") => panic!("a batch form that panics"),
            Some("error") => Err(sagaflow::engine::StepError::retryable("the batch call failed")),
            Some("short") => Ok(answers().into_iter().skip(1).collect()),
            Some("slow") => {
                tokio::time::sleep(Duration::from_secs(2)).await;
                Ok(answers())
            }
            _ => Ok(answers()),
        }
    }
}

/// A workflow of two local steps with batch forms; the second runs only for even `n`.
fn echoing() -> sagaflow::engine::Workflow {
    use sagaflow::engine::StepDef;
    sagaflow::engine::Workflow::builder("echo", 1)
        .step(
            StepDef::new("echo", Echo)
                .local()
                .batch(Echo)
                .timeout(Duration::from_millis(500)),
        )
        .step(
            StepDef::new("echo-even", Echo)
                .local()
                .batch(Echo)
                .when(|view| view.input_value()["n"].as_i64().is_some_and(|n| n % 2 == 0)),
        )
        .build()
        .expect("valid")
}

/// Whatever keeps a cohort from going through (a batch call that panics, fails, answers for
/// fewer runs, outlasts its step's timeout; runs whose plans part; two runs of one key, of
/// which only one may be inserted) gives it up without a trace: each run goes on alone and
/// ends as it would have without cohorts, and only a cohort that went through shares a
/// transaction.
#[tokio::test]
async fn whatever_keeps_a_cohort_from_going_through_leaves_its_runs_to_go_on_alone() {
    let cases: [(&str, &[i64], Option<&str>, bool); 7] = [
        ("ok", &[2, 4, 6], None, true),
        ("panic", &[2, 4, 6], None, false),
        ("error", &[2, 4, 6], None, false),
        ("short", &[2, 4, 6], None, false),
        ("slow", &[2, 4], None, false),
        ("ok", &[2, 3, 4], None, false),
        ("ok", &[2, 2, 4], Some("one-key"), false),
    ];
    for (mode, numbers, key, together) in cases {
        let db = test_db().await;
        let engine = Engine::builder(db.pool.clone())
            .config(EngineConfig {
                max_concurrent_runs: 64,
                commit_lanes: 0,
                cohort_runners: 1,
                cohort_gather: Duration::from_millis(400),
                ..fast_config("echo")
            })
            .register(echoing())
            .build()
            .expect("engine");
        let worker = engine.start_worker().await.expect("worker");
        // The key, if any, is the first two triggers'.
        let waits = numbers.iter().enumerate().map(|(i, &n)| {
            let options = TriggerOptions {
                idempotency_key: key.filter(|_| i < 2).map(str::to_string),
                ..TriggerOptions::default()
            };
            engine.trigger_and_wait("echo", json!({"n": n, "mode": mode}), options, Duration::from_secs(20))
        });
        let answers = futures::future::join_all(waits).await;
        let what = format!("{mode} {numbers:?} {key:?}");
        for (answer, &n) in answers.iter().zip(numbers) {
            let detail = answer.as_ref().expect("answered").detail.clone().expect("the run");
            assert_eq!(detail.run.status, RunStatus::Completed, "{what}");
            assert_eq!(detail.steps[0].output, Some(json!(n)), "{what}");
            let second = if n % 2 == 0 { Some(json!(n)) } else { None };
            assert_eq!(detail.steps[1].output, second, "{what}");
            let attempts: Vec<i32> = detail.steps.iter().map(|s| s.attempts).collect();
            assert_eq!(
                attempts,
                [1, i32::from(n % 2 == 0)],
                "{what}: nothing of the cohort recorded"
            );
        }
        let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM runs")
            .fetch_one(&db.pool)
            .await
            .expect("count");
        let expected_runs = numbers.len() as i64 - i64::from(key.is_some());
        assert_eq!(runs, expected_runs, "{what}");
        if key.is_some() {
            let (a, b) = (&answers[0], &answers[1]);
            let (a, b) = (
                &a.as_ref().expect("answered").triggered,
                &b.as_ref().expect("answered").triggered,
            );
            assert_eq!(a.run_id, b.run_id, "{what}: one run for one key");
            assert!(a.created != b.created, "{what}: one trigger created it");
        }
        let writers = writing_transactions(&db.pool).await;
        assert_eq!(writers == 1, together, "{what}: {writers} transactions for {runs} runs");
        worker.shutdown().await;
    }
}
