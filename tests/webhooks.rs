//! Outbound webhooks (DESIGN.md §10) against a real server, a real PostgreSQL and a real
//! receiver on port 0 that records every request: deliveries written with the outcome they
//! report, retried with the same `webhook-id` until accepted, in order per run, signed as
//! Standard Webhooks (checked by an independent implementation), failed past their window and
//! redelivered by hand.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::participant::{Answer, Participant};
use common::server::{self, TestServer, read};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const SECRET: &str = "whsec_MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
const SECRET_VAR: &str = "SAGAFLOW_TEST_HOOK_SECRET";

fn vars() -> sagaflow::defined::Vars {
    Arc::new(|name: &str| (name == SECRET_VAR).then(|| SECRET.to_string()))
}

async fn start(tweak: impl FnOnce(&mut sagaflow::server::ServerConfig)) -> TestServer {
    server::start_with(|c| {
        c.defined.vars = Some(vars());
        tweak(c);
    })
    .await
}

async fn admin(server: &TestServer, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
    let mut request = server.admin(method, path).header("x-sagaflow-operator", "ada");
    if let Some(body) = body {
        request = request.json(&body);
    }
    read(request.send().await.expect("request")).await
}

async fn deliveries(server: &TestServer, name: &str) -> Vec<Value> {
    let (status, body) = read(
        server
            .api(Method::GET, &format!("/v1/webhooks/{name}/deliveries"))
            .send()
            .await
            .expect("deliveries"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["deliveries"].as_array().cloned().unwrap_or_default()
}

async fn until<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    common::eventually(Duration::from_secs(30), what, check).await
}

async fn subscription_rows(server: &TestServer) -> (i64, i64) {
    sqlx::query_as("SELECT (SELECT count(*) FROM webhook_subscriptions), (SELECT count(*) FROM webhook_deliveries)")
        .fetch_one(server.pool())
        .await
        .expect("counts")
}

#[tokio::test]
async fn a_receiver_that_fails_three_times_gets_the_same_signed_delivery_until_it_accepts_in_order_per_run() {
    let receiver = Participant::start().await;
    receiver.script("/hook", (0..3).map(|_| Answer::Json(500, json!({"down": true}))));
    let server = start(|_| {}).await;
    let url = format!("{}/hook", receiver.base_url());
    let subscription = json!({
        "name": "ops", "url": url, "secret_env": SECRET_VAR,
        "events": ["run.completed", "run.compensated", "event.customer.created"],
        "workflows": ["create-customer-account"]
    });

    // Refusals write nothing.
    let before = subscription_rows(&server).await;
    let (status, _) = read(
        server
            .api(Method::POST, "/v1/webhooks")
            .json(&subscription)
            .send()
            .await
            .expect("post"),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "the API token cannot subscribe");
    type Change = Box<dyn Fn(&mut Value)>;
    let refusals: Vec<(Change, &str)> = vec![
        (Box::new(|s| s["events"] = json!(["run.exploded"])), "events[0]"),
        (Box::new(|s| s["events"] = json!([])), "events"),
        (
            Box::new(|s| s["secret_env"] = json!("SAGAFLOW_TEST_UNSET")),
            "secret_env",
        ),
        (Box::new(|s| s["url"] = json!("http://example.com/hook")), "url"),
        (Box::new(|s| s["url"] = json!("ftp://127.0.0.1/hook")), "url"),
        (Box::new(|s| s["name"] = json!("Bad Name")), "name"),
        (Box::new(|s| s["workflows"] = json!([])), "workflows"),
        (Box::new(|s| s["colour"] = json!("red")), "."),
    ];
    for (change, field) in refusals {
        let mut body = subscription.clone();
        change(&mut body);
        let (status, answer) = admin(&server, Method::POST, "/v1/webhooks", Some(body.clone())).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {answer}");
        if field != "." {
            assert_eq!(answer["error"]["field"], field, "{answer}");
        }
    }
    assert_eq!(subscription_rows(&server).await, before, "a refusal writes nothing");

    let (status, created) = admin(&server, Method::POST, "/v1/webhooks", Some(subscription.clone())).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["secret_env"], SECRET_VAR);
    assert!(!created.to_string().contains(SECRET), "the secret is never answered");
    let (status, _) = admin(&server, Method::POST, "/v1/webhooks", Some(subscription.clone())).await;
    assert_eq!(status, StatusCode::CONFLICT, "the name is taken");
    // Another subscription, for another workflow only: it receives nothing of this run.
    let mut elsewhere = subscription.clone();
    elsewhere["workflows"] = json!(["some-other-workflow"]);
    elsewhere["name"] = json!("elsewhere");
    let (status, _) = admin(&server, Method::PUT, "/v1/webhooks/elsewhere", Some(elsewhere)).await;
    assert_eq!(status, StatusCode::CREATED);

    let identity = server.identity("hooked@example.com").await;
    let run = server.register(&identity, "hooked@example.com").await;
    assert_eq!(run["status"], "completed", "{run}");
    let run_id = run["id"].as_str().expect("id").to_string();

    let seen = until("the run's two deliveries to be accepted", || async {
        let seen = receiver.seen_at("/hook");
        (seen.len() >= 5).then_some(seen)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seen_now = receiver.seen_at("/hook");
    assert_eq!(seen_now.len(), 5, "three refusals, then each delivery once");
    let ids: Vec<String> = seen.iter().map(|r| r.header("webhook-id")).collect();
    assert!(
        ids[..4].iter().all(|id| id == &ids[0]),
        "the same webhook-id on every attempt: {ids:?}"
    );
    assert_ne!(ids[4], ids[0]);
    let types: Vec<&str> = seen
        .iter()
        .map(|r| r.body["type"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        types,
        [
            "run.completed",
            "run.completed",
            "run.completed",
            "run.completed",
            "event.customer.created"
        ],
        "in order per run: the event waits for the outcome before it"
    );
    let verifier = standardwebhooks::Webhook::new(SECRET).expect("secret");
    for request in &seen {
        // An independent implementation of Standard Webhooks accepts every signature.
        verifier
            .verify(&request.raw, &request.headers)
            .unwrap_or_else(|e| panic!("signature refused: {e}"));
        assert_eq!(request.body["id"], request.header("webhook-id"));
        assert!(request.body["timestamp"].is_string());
    }
    assert_eq!(seen[3].body["data"]["run"]["id"], run_id);
    assert_eq!(seen[3].body["data"]["run"]["status"], "completed");
    assert_eq!(seen[4].body["data"]["event"]["name"], "customer.created");
    assert_eq!(seen[4].body["data"]["event"]["run_id"], run_id);

    let listed = deliveries(&server, "ops").await;
    let summary: Vec<(Value, Value, Value)> = listed
        .iter()
        .map(|d| (d["event_type"].clone(), d["status"].clone(), d["attempts"].clone()))
        .collect();
    assert_eq!(
        summary,
        [
            (json!("event.customer.created"), json!("delivered"), json!(1)),
            (json!("run.completed"), json!("delivered"), json!(4)),
        ]
    );
    assert!(
        deliveries(&server, "elsewhere").await.is_empty(),
        "filtered by workflow"
    );

    // A test delivery answers what the receiver said.
    let (status, tested) = admin(&server, Method::POST, "/v1/webhooks/ops/test", None).await;
    assert_eq!(status, StatusCode::OK, "{tested}");
    assert_eq!(tested["outcome"]["delivered"], true, "{tested}");
    assert_eq!(
        receiver.seen_at("/hook").last().map(|r| r.body["type"].clone()),
        Some(json!("webhook.test"))
    );

    // A redelivery keeps the webhook-id.
    let first = listed[1]["id"].as_i64().expect("id");
    let (status, again) = admin(
        &server,
        Method::POST,
        &format!("/v1/webhooks/ops/deliveries/{first}/redeliver"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{again}");
    let resent = until("the redelivery", || async {
        let seen = receiver.seen_at("/hook");
        (seen.len() >= 7).then(|| seen[6].header("webhook-id"))
    })
    .await;
    assert_eq!(resent, ids[0]);
    for (path, expected) in [
        ("/v1/webhooks/ops/deliveries/999999/redeliver", StatusCode::NOT_FOUND),
        (
            "/v1/webhooks/ops/deliveries/not-a-number/redeliver",
            StatusCode::NOT_FOUND,
        ),
        ("/v1/webhooks/nobody/test", StatusCode::NOT_FOUND),
    ] {
        let (status, _) = admin(&server, Method::POST, path, None).await;
        assert_eq!(status, expected, "{path}");
    }
    let (status, _) = read(
        server
            .api(Method::GET, "/v1/webhooks/nobody")
            .send()
            .await
            .expect("get"),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, listed) = read(server.api(Method::GET, "/v1/webhooks").send().await.expect("list")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(listed["webhooks"].as_array().map(Vec::len), Some(2));

    let (status, _) = admin(&server, Method::DELETE, "/v1/webhooks/elsewhere", None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = admin(&server, Method::DELETE, "/v1/webhooks/elsewhere", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let audit: Vec<String> = sqlx::query_scalar(
        "SELECT action FROM operator_actions WHERE action LIKE 'webhook.%' AND operator = 'ada' ORDER BY id",
    )
    .fetch_all(server.pool())
    .await
    .expect("audit");
    assert_eq!(
        audit,
        [
            "webhook.create",
            "webhook.create",
            "webhook.test",
            "webhook.redeliver",
            "webhook.delete"
        ]
    );
    // The retention sweep deletes a run's deliveries with it (the test delivery has no run).
    let swept = server
        .engine()
        .delete_finished_runs(chrono::Utc::now() + chrono::Duration::hours(1), 100)
        .await
        .expect("sweep");
    assert!(swept >= 1);
    let left: Vec<String> = sqlx::query_scalar("SELECT event_type FROM webhook_deliveries")
        .fetch_all(server.pool())
        .await
        .expect("left");
    assert_eq!(left, ["webhook.test"]);
    server.stop().await;
}

#[tokio::test]
async fn a_receiver_down_past_the_retry_window_leaves_the_delivery_failed_visible_and_counted() {
    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    let server = start(|c| {
        c.webhooks.retry_window = Duration::from_secs(1);
        c.webhooks.first_retry = Duration::from_millis(100);
    })
    .await;
    let subscription = json!({
        "name": "down", "url": format!("http://127.0.0.1:{port}/hook"), "secret_env": SECRET_VAR,
        "events": ["run.completed"]
    });
    let (status, body) = admin(&server, Method::POST, "/v1/webhooks", Some(subscription)).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let identity = server.identity("down@example.com").await;
    let run = server.register(&identity, "down@example.com").await;
    assert_eq!(run["status"], "completed");
    let failed = until("the delivery to be marked failed", || async {
        let listed = deliveries(&server, "down").await;
        listed.into_iter().find(|d| d["status"] == "failed")
    })
    .await;
    assert!(
        failed["attempts"].as_i64().unwrap_or_default() >= 2,
        "retried before giving up: {failed}"
    );
    assert!(
        failed["last_error"].as_str().is_some_and(|e| !e.is_empty()),
        "why is kept: {failed}"
    );
    assert!(failed["delivered_at"].is_null());
    let metrics = server.metrics().await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("sagaflow_webhook_deliveries_total") && l.contains("outcome=\"failed\"")),
        "{metrics}"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_wait_no_worker_ended_past_its_deadline_is_reported_overdue_once() {
    let receiver = Participant::start().await;
    let server = start(|_| {}).await;
    let subscription = json!({
        "name": "pager", "url": format!("{}/hook", receiver.base_url()), "secret_env": SECRET_VAR,
        "events": ["run.wait_overdue"]
    });
    let (status, body) = admin(&server, Method::POST, "/v1/webhooks", Some(subscription)).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    // The sweep writes these deliveries itself: the run triggers stay off (0021).
    assert_eq!(triggers_on(server.pool()).await, (false, false, false));
    let definition = json!({
        "endpoints": {"shop": {"base_url": receiver.base_url()}},
        "steps": [{"name": "await-payment", "wait": {"signal": "paid", "timeout": "1h"}}]
    });
    let (status, body) = admin(
        &server,
        Method::PUT,
        "/v1/workflow-definitions/patient",
        Some(definition),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, run) = read(
        server
            .api(Method::POST, "/v1/workflows/patient/runs")
            .json(&json!({"n": 1}))
            .send()
            .await
            .expect("trigger"),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{run}");
    let run_id = run["id"].as_str().expect("id").to_string();
    until("the run to wait", || async {
        let (_, body) = read(
            server
                .api(Method::GET, &format!("/v1/runs/{run_id}"))
                .send()
                .await
                .expect("get"),
        )
        .await;
        (body["waiting"]["name"] == "paid").then_some(())
    })
    .await;
    // A wait well within its deadline is not overdue.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(receiver.seen_at("/hook").is_empty());
    // As if its deadline had passed with no worker to end it (its due time left as it was).
    sqlx::query("UPDATE runs SET wait_deadline = now() - interval '5 minutes' WHERE id = $1::uuid")
        .bind(&run_id)
        .execute(server.pool())
        .await
        .expect("overdue");
    let seen = until("the overdue wait to be reported", || async {
        let seen = receiver.seen_at("/hook");
        (!seen.is_empty()).then_some(seen)
    })
    .await;
    assert_eq!(seen[0].body["type"], "run.wait_overdue");
    assert_eq!(seen[0].body["data"]["run"]["id"], run_id);
    assert_eq!(seen[0].body["data"]["run"]["waiting"]["name"], "paid");
    // Later sweeps find the same wait and write nothing more.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(receiver.seen_at("/hook").len(), 1, "one report per wait");
    assert_eq!(deliveries(&server, "pager").await.len(), 1);
    server.stop().await;
}

/// A delivery row of `run`: who it is for, what it reports, and its body.
async fn deliveries_of(db: &sqlx::PgPool, run: uuid::Uuid) -> Vec<(String, String, Value)> {
    let rows: Vec<(String, String, String)> =
        sqlx::query_as("SELECT subscription, event_type, body FROM webhook_deliveries WHERE run_id = $1 ORDER BY id")
            .bind(run)
            .fetch_all(db)
            .await
            .expect("deliveries");
    rows.into_iter()
        .map(|(s, t, body)| (s, t, serde_json::from_str(&body).expect("a JSON body")))
        .collect()
}

/// The database triggers alone (no server): a delivery is written exactly when a change that
/// an enabled subscription wants commits, and shows the row as the statement wrote it. They
/// run before the row is written and look for a subscription before building a body
/// (`0015_cheap_webhook_triggers`), so this holds that to what the first version did.
#[tokio::test]
async fn the_triggers_write_a_delivery_only_for_a_committed_change_an_enabled_subscription_wants() {
    let db = common::test_db().await;
    let pool = &db.pool;
    for (name, events, workflows, enabled) in [
        (
            "all",
            vec!["run.completed", "run.failed", "event.customer.created"],
            None,
            true,
        ),
        ("off", vec!["run.completed", "event.customer.created"], None, false),
        ("failures", vec!["run.failed"], None, true),
        (
            "elsewhere",
            vec!["run.completed", "event.customer.created"],
            Some(vec!["another-workflow"]),
            true,
        ),
    ] {
        sqlx::query(
            "INSERT INTO webhook_subscriptions (name, url, events, workflows, secret_env, enabled)
             VALUES ($1, 'http://127.0.0.1:9/hook', $2, $3, 'SAGAFLOW_TEST_HOOK_SECRET', $4)",
        )
        .bind(name)
        .bind(events)
        .bind(workflows)
        .bind(enabled)
        .execute(pool)
        .await
        .expect("subscription");
    }
    let run = uuid::Uuid::now_v7();
    // A running run, parked so that it is reachable without a lease.
    sqlx::query(
        "INSERT INTO runs (id, workflow, workflow_version, status, input, trigger, parked_reason)
         VALUES ($1, 'create-customer-account', 1, 'running', '{}', 'api', 'a test')",
    )
    .bind(run)
    .execute(pool)
    .await
    .expect("run");
    sqlx::query("INSERT INTO outbox_events (id, name, data, run_id) VALUES ('evt_trigger_test', 'customer.created', '{\"id\": \"cus_1\"}', $1)")
        .bind(run)
        .execute(pool)
        .await
        .expect("event");
    let finish = "UPDATE runs SET status = 'completed', parked_reason = NULL, output = '{\"done\": true}',
                      finished_at = clock_timestamp(), updated_at = '2026-06-01T12:00:00.123456Z'
                  WHERE id = $1";

    // An update that does not finish the run reports nothing.
    sqlx::query("UPDATE runs SET updated_at = clock_timestamp(), status = 'running' WHERE id = $1")
        .bind(run)
        .execute(pool)
        .await
        .expect("no finish");
    assert!(deliveries_of(pool, run).await.is_empty());

    // A finish rolled back leaves no delivery, though its transaction saw one.
    let mut tx = pool.begin().await.expect("begin");
    sqlx::query(finish).bind(run).execute(&mut *tx).await.expect("finish");
    let inside: i64 = sqlx::query_scalar("SELECT count(*) FROM webhook_deliveries WHERE run_id = $1")
        .bind(run)
        .fetch_one(&mut *tx)
        .await
        .expect("count");
    assert_eq!(inside, 1, "written by the statement that finishes the run");
    tx.rollback().await.expect("rollback");
    assert!(deliveries_of(pool, run).await.is_empty(), "rolled back with the finish");

    // Committed: one delivery, to the one enabled subscription that wants it.
    sqlx::query(finish).bind(run).execute(pool).await.expect("finish");
    let written = deliveries_of(pool, run).await;
    let who: Vec<(&str, &str)> = written.iter().map(|(s, t, _)| (s.as_str(), t.as_str())).collect();
    assert_eq!(who, [("all", "run.completed")]);
    let body = &written[0].2;
    assert_eq!(body["type"], "run.completed");
    assert_eq!(body["data"]["run"]["id"], run.to_string());
    assert_eq!(body["data"]["run"]["status"], "completed", "the row as written: {body}");
    assert_eq!(body["data"]["run"]["output"], json!({"done": true}));
    let (updated_at, finished_at): (String, String) =
        sqlx::query_as("SELECT to_jsonb(updated_at)::text, to_jsonb(finished_at)::text FROM runs WHERE id = $1")
            .bind(run)
            .fetch_one(pool)
            .await
            .expect("times");
    assert_eq!(body["data"]["run"]["updated_at"].to_string(), updated_at);
    assert_eq!(body["data"]["run"]["finished_at"].to_string(), finished_at);

    // The event's release: filtered by its run's workflow, the release as written.
    sqlx::query(
        "UPDATE outbox_events SET status = 'released', released_at = '2026-06-01T12:00:01Z',
             released_xid = pg_current_xact_id()
         WHERE run_id = $1",
    )
    .bind(run)
    .execute(pool)
    .await
    .expect("release");
    let written = deliveries_of(pool, run).await;
    let who: Vec<(&str, &str)> = written.iter().map(|(s, t, _)| (s.as_str(), t.as_str())).collect();
    assert_eq!(who, [("all", "run.completed"), ("all", "event.customer.created")]);
    let event = &written[1].2["data"]["event"];
    assert_eq!(event["id"], "evt_trigger_test");
    assert_eq!(event["data"], json!({"id": "cus_1"}));
    let released_at: String =
        sqlx::query_scalar("SELECT to_jsonb(released_at)::text FROM outbox_events WHERE run_id = $1")
            .bind(run)
            .fetch_one(pool)
            .await
            .expect("released at");
    assert_eq!(event["released_at"].to_string(), released_at);
    // Released again (it stays released): nothing more.
    sqlx::query("UPDATE outbox_events SET status = 'released' WHERE run_id = $1")
        .bind(run)
        .execute(pool)
        .await
        .expect("again");
    assert_eq!(deliveries_of(pool, run).await.len(), 2);
    // Nor does a finished run's status written again (the trigger fires on entering a
    // terminal status, not on being in one).
    sqlx::query(finish).bind(run).execute(pool).await.expect("finish again");
    assert_eq!(deliveries_of(pool, run).await.len(), 2);
}

/// A run inserted already finished (a waiting trigger's first segment inserts a registration
/// `completed`) gets the same delivery as a run updated into its end
/// (`0018_webhooks_for_runs_inserted_finished`); a run inserted unfinished gets none.
#[tokio::test]
async fn a_run_inserted_finished_gets_the_delivery_of_a_run_that_finishes_later() {
    let db = common::test_db().await;
    let pool = &db.pool;
    sqlx::query(
        "INSERT INTO webhook_subscriptions (name, url, events, secret_env)
         VALUES ('all', 'http://127.0.0.1:9/hook', ARRAY['run.completed'], 'SAGAFLOW_TEST_HOOK_SECRET')",
    )
    .execute(pool)
    .await
    .expect("subscription");
    let insert =
        "INSERT INTO runs (id, workflow, workflow_version, status, input, trigger, parked_reason, finished_at, output)
                  VALUES ($1, 'create-customer-account', 1, $2::run_status, '{}', 'api',
                          CASE WHEN $2 = 'running' THEN 'a test' END,
                          CASE WHEN $2 = 'completed' THEN clock_timestamp() END, '{\"done\": true}')";
    let unfinished = uuid::Uuid::now_v7();
    sqlx::query(insert)
        .bind(unfinished)
        .bind("running")
        .execute(pool)
        .await
        .expect("unfinished run");
    assert!(deliveries_of(pool, unfinished).await.is_empty());

    let finished = uuid::Uuid::now_v7();
    sqlx::query(insert)
        .bind(finished)
        .bind("completed")
        .execute(pool)
        .await
        .expect("finished run");
    let written = deliveries_of(pool, finished).await;
    let who: Vec<(&str, &str)> = written.iter().map(|(s, t, _)| (s.as_str(), t.as_str())).collect();
    assert_eq!(who, [("all", "run.completed")]);
    assert_eq!(written[0].2["data"]["run"]["id"], finished.to_string());
    assert_eq!(written[0].2["data"]["run"]["status"], "completed");
    assert_eq!(written[0].2["data"]["run"]["output"], json!({"done": true}));
}

/// Runs one statement that must succeed.
async fn exec(db: &sqlx::PgPool, sql: &'static str) {
    sqlx::query(sql)
        .execute(db)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// Which of the webhook triggers are on: the two on `runs` (finish by update, inserted
/// finished) and the one on `outbox_events` (release).
async fn triggers_on(db: &sqlx::PgPool) -> (bool, bool, bool) {
    sqlx::query_as(
        "SELECT bool_or(tgname = 'runs_webhook_on_finish' AND tgenabled <> 'D'),
                bool_or(tgname = 'runs_webhook_on_insert_finished' AND tgenabled <> 'D'),
                bool_or(tgname = 'outbox_webhook_on_release' AND tgenabled <> 'D')
         FROM pg_trigger
         WHERE tgname IN ('runs_webhook_on_finish', 'runs_webhook_on_insert_finished', 'outbox_webhook_on_release')",
    )
    .fetch_one(db)
    .await
    .expect("triggers")
}

async fn subscribe<'e>(db: impl sqlx::PgExecutor<'e>, name: &str, events: &[&str]) {
    sqlx::query(
        "INSERT INTO webhook_subscriptions (name, url, events, secret_env)
         VALUES ($1, 'http://127.0.0.1:9/hook', $2, 'SAGAFLOW_TEST_HOOK_SECRET')",
    )
    .bind(name)
    .bind(events)
    .execute(db)
    .await
    .expect("subscription");
}

/// A writer holding `runs` (an uncommitted insert of a parked run) for longer than the
/// trigger switch waits for its lock; rolled back by the caller.
async fn hold_runs(pool: &sqlx::PgPool) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut writer = pool.begin().await.expect("begin");
    sqlx::query(
        "INSERT INTO runs (id, workflow, workflow_version, status, input, trigger, parked_reason)
         VALUES ($1, 'create-customer-account', 1, 'running', '{}', 'api', 'a test')",
    )
    .bind(uuid::Uuid::now_v7())
    .execute(&mut *writer)
    .await
    .expect("run");
    writer
}

/// The triggers cost a function call at every finish and release, so they are on only while
/// an enabled subscription wants what they report (`0020_webhook_triggers_only_while_subscribed`):
/// turned on and off by the change of the subscriptions, in its transaction (not by one rolled
/// back), each as the subscriptions want it (the release trigger alone delivers an event;
/// `run.wait_overdue`, which the engine's sweep writes itself, wants none:
/// `0021_wait_overdue_needs_no_run_trigger`).
#[tokio::test]
async fn the_webhook_triggers_are_on_exactly_while_an_enabled_subscription_wants_what_they_report() {
    let db = common::test_db().await;
    let pool = &db.pool;
    assert_eq!(triggers_on(pool).await, (false, false, false), "no subscription yet");
    subscribe(pool, "pager", &["run.wait_overdue"]).await;
    assert_eq!(
        triggers_on(pool).await,
        (false, false, false),
        "overdue waits need no trigger"
    );
    exec(pool, "DELETE FROM webhook_subscriptions").await;

    // A run finished and an event released while nobody subscribed: nothing to deliver.
    let run = uuid::Uuid::now_v7();
    sqlx::query(
        "INSERT INTO runs (id, workflow, workflow_version, status, input, trigger, finished_at)
         VALUES ($1, 'create-customer-account', 1, 'completed', '{}', 'api', clock_timestamp())",
    )
    .bind(run)
    .execute(pool)
    .await
    .expect("run");
    let release = |id: &'static str| {
        sqlx::query("INSERT INTO outbox_events (id, name, data, run_id) VALUES ($1, 'customer.created', '{}', $2)")
            .bind(id)
            .bind(run)
    };
    release("evt_unwatched").execute(pool).await.expect("event");
    let settle =
        "UPDATE outbox_events SET status = 'released', released_at = now(), released_xid = pg_current_xact_id()
                  WHERE id = $1";
    sqlx::query(settle)
        .bind("evt_unwatched")
        .execute(pool)
        .await
        .expect("release");
    assert!(deliveries_of(pool, run).await.is_empty());

    // Events only: the release trigger alone; runs stay unreported.
    subscribe(pool, "events", &["event.customer.created"]).await;
    assert_eq!(triggers_on(pool).await, (false, false, true));
    release("evt_watched").execute(pool).await.expect("event");
    sqlx::query(settle)
        .bind("evt_watched")
        .execute(pool)
        .await
        .expect("release");
    let types: Vec<String> = deliveries_of(pool, run).await.into_iter().map(|(_, t, _)| t).collect();
    assert_eq!(types, ["event.customer.created"]);

    // Rolled back, the change of the subscriptions leaves the triggers as they were.
    let mut tx = pool.begin().await.expect("begin");
    sqlx::query("UPDATE webhook_subscriptions SET events = events || '{run.completed}'")
        .execute(&mut *tx)
        .await
        .expect("more events");
    tx.rollback().await.expect("rollback");
    assert_eq!(triggers_on(pool).await, (false, false, true));

    // Runs too: both run triggers on.
    exec(
        pool,
        "UPDATE webhook_subscriptions SET events = events || '{run.completed}'",
    )
    .await;
    assert_eq!(triggers_on(pool).await, (true, true, true));

    // Disabled, or deleted: all off.
    exec(pool, "UPDATE webhook_subscriptions SET enabled = false").await;
    assert_eq!(triggers_on(pool).await, (false, false, false));
    exec(pool, "UPDATE webhook_subscriptions SET enabled = true").await;
    assert_eq!(triggers_on(pool).await, (true, true, true));
    exec(pool, "DELETE FROM webhook_subscriptions").await;
    assert_eq!(triggers_on(pool).await, (false, false, false));

    // A transaction whose snapshot is older than its statements may miss a subscription
    // committed meanwhile, so it turns triggers on, never off.
    subscribe(pool, "runs", &["run.failed"]).await;
    let mut tx = pool.begin().await.expect("begin");
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut *tx)
        .await
        .expect("repeatable read");
    sqlx::query("DELETE FROM webhook_subscriptions")
        .execute(&mut *tx)
        .await
        .expect("delete");
    tx.commit().await.expect("commit");
    assert_eq!(triggers_on(pool).await, (true, true, true), "left on");
    exec(pool, "DELETE FROM webhook_subscriptions").await;
    assert_eq!(triggers_on(pool).await, (false, false, false));
}

/// Two changes of the subscriptions at once: one adds the first subscription while the other
/// deletes the last committed one. Whichever order they commit in, the triggers end as the
/// subscriptions left committed want (here: on). Without the lock that serializes them, or
/// with the subscriptions read before it, the deletion would see none and turn them off.
#[tokio::test]
async fn concurrent_changes_of_the_subscriptions_leave_the_triggers_as_the_committed_ones_want() {
    let db = common::test_db().await;
    let pool = &db.pool;
    subscribe(pool, "old", &["run.completed"]).await;
    assert_eq!(triggers_on(pool).await, (true, true, false));

    let mut adding = pool.begin().await.expect("begin");
    subscribe(&mut *adding, "new", &["run.completed", "event.customer.created"]).await;
    let deleting = {
        let pool = pool.clone();
        tokio::spawn(async move {
            sqlx::query("DELETE FROM webhook_subscriptions WHERE name = 'old'")
                .execute(&pool)
                .await
                .expect("delete")
        })
    };
    // The deletion waits for the addition's lock.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!deleting.is_finished(), "the second change waits for the first");
    adding.commit().await.expect("commit");
    deleting.await.expect("deleted");
    let names: Vec<String> = sqlx::query_scalar("SELECT name FROM webhook_subscriptions")
        .fetch_all(pool)
        .await
        .expect("names");
    assert_eq!(names, ["new"]);
    assert_eq!(triggers_on(pool).await, (true, true, true));
}

/// Switching the triggers waits for the writes to `runs` in flight, for 5 s at most
/// (`lock_timeout`): a first subscription that cannot get the lock in time fails, and leaves
/// no subscription behind and the triggers as they were.
#[tokio::test]
async fn a_first_subscription_that_cannot_switch_the_triggers_in_time_fails_and_changes_nothing() {
    let db = common::test_db().await;
    let pool = &db.pool;
    let writer = hold_runs(pool).await;
    let refused = sqlx::query(
        "INSERT INTO webhook_subscriptions (name, url, events, secret_env)
         VALUES ('late', 'http://127.0.0.1:9/hook', '{run.completed}', 'SAGAFLOW_TEST_HOOK_SECRET')",
    )
    .execute(pool)
    .await
    .expect_err("the switch cannot get its lock");
    let code = refused
        .as_database_error()
        .and_then(|e| e.code())
        .map(|c| c.to_string());
    assert_eq!(code.as_deref(), Some("55P03"), "lock_not_available: {refused}");
    writer.rollback().await.expect("rollback");
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM webhook_subscriptions")
        .fetch_one(pool)
        .await
        .expect("count");
    assert_eq!(left, 0);
    assert_eq!(triggers_on(pool).await, (false, false, false));
}

/// Over HTTP, the same refusal is a 503 `busy` with `Retry-After`, and changes nothing: no
/// subscription, no audit entry, the triggers off. The wait it reports is the switch's own
/// `lock_timeout`.
#[tokio::test]
async fn a_subscription_whose_trigger_switch_times_out_is_answered_busy_and_stores_nothing() {
    let server = start(|_| {}).await;
    let pool = server.pool();
    let config: Vec<String> = sqlx::query_scalar(
        "SELECT unnest(proconfig) FROM pg_proc WHERE proname = 'webhook_triggers_follow_subscriptions'",
    )
    .fetch_all(pool)
    .await
    .expect("proconfig");
    let timeout = format!("lock_timeout={}s", sagaflow::webhooks::SWITCH_LOCK_TIMEOUT_S);
    assert!(config.contains(&timeout), "{config:?} has {timeout}");

    let writer = hold_runs(pool).await;
    let response = server
        .admin(Method::PUT, "/v1/webhooks/late")
        .header("x-sagaflow-operator", "ada")
        .json(&json!({"url": "http://127.0.0.1:9/hook", "events": ["run.completed"], "secret_env": SECRET_VAR}))
        .send()
        .await
        .expect("put");
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    let (status, body) = read(response).await;
    writer.rollback().await.expect("rollback");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], "busy", "{body}");
    assert_eq!(retry_after.as_deref(), Some("5"));
    assert_eq!(subscription_rows(&server).await, (0, 0));
    let audited: i64 = sqlx::query_scalar("SELECT count(*) FROM operator_actions WHERE detail->>'webhook' = 'late'")
        .fetch_one(pool)
        .await
        .expect("audit");
    assert_eq!(audited, 0);
    assert_eq!(triggers_on(pool).await, (false, false, false));

    // Once the writer is gone, the same request goes through.
    let (status, body) = admin(
        &server,
        Method::PUT,
        "/v1/webhooks/late",
        Some(json!({"url": "http://127.0.0.1:9/hook", "events": ["run.completed"], "secret_env": SECRET_VAR})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(triggers_on(pool).await, (true, true, false));
    server.stop().await;
}

/// The switch runs as the owner of the tables (SECURITY DEFINER): a role that may change the
/// subscriptions but owns neither `runs` nor `outbox_events`, and cannot alter them itself,
/// still turns the triggers on with its first subscription and off with its last.
#[tokio::test]
async fn a_role_that_may_only_change_the_subscriptions_still_switches_the_triggers() {
    let db = common::test_db().await;
    let pool = &db.pool;
    // Roles belong to the cluster, which other tests share: a name of this test's own.
    let role = format!("hooks_{}", uuid::Uuid::new_v4().simple());
    // The name is ours (a UUID's hex digits), so the statements naming it are safe.
    let on_role = |sql: String| sqlx::query(sqlx::AssertSqlSafe(sql));
    on_role(format!("CREATE ROLE {role}"))
        .execute(pool)
        .await
        .expect("create role");
    on_role(format!(
        "GRANT SELECT, INSERT, UPDATE, DELETE ON webhook_subscriptions TO {role}"
    ))
    .execute(pool)
    .await
    .expect("grant");
    let mut conn = pool.acquire().await.expect("connection");
    on_role(format!("SET ROLE {role}"))
        .execute(&mut *conn)
        .await
        .expect("set role");

    let denied = sqlx::query("ALTER TABLE runs ENABLE TRIGGER runs_webhook_on_finish")
        .execute(&mut *conn)
        .await
        .expect_err("not the owner of runs");
    let code = denied.as_database_error().and_then(|e| e.code()).map(|c| c.to_string());
    assert_eq!(code.as_deref(), Some("42501"), "insufficient_privilege: {denied}");

    subscribe(&mut *conn, "ops", &["run.completed", "event.customer.created"]).await;
    assert_eq!(triggers_on(pool).await, (true, true, true));
    sqlx::query("DELETE FROM webhook_subscriptions")
        .execute(&mut *conn)
        .await
        .expect("the role unsubscribes");
    assert_eq!(triggers_on(pool).await, (false, false, false));

    sqlx::query("RESET ROLE").execute(&mut *conn).await.expect("reset role");
    drop(conn);
    on_role(format!("DROP OWNED BY {role}"))
        .execute(pool)
        .await
        .expect("drop owned");
    on_role(format!("DROP ROLE {role}"))
        .execute(pool)
        .await
        .expect("drop role");
}
