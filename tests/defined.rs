//! Workflows defined as data (docs/contract.md §8) against a real server, a real PostgreSQL
//! and a real participant HTTP server that records every request: definitions stored and
//! versioned by content, refused with the field named, HTTP steps signed and read as the
//! contract says, compensations called in reverse order with each step's output.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::participant::{Answer, Participant};
use common::server::{self, TestServer, assert_triggered, read};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// The signing secret the definitions name (read through the server's `vars`, never stored).
const SECRET: &str = "whsec_MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
const SECRET_VAR: &str = "SAGAFLOW_TEST_SHOP_SECRET";
const TOKEN: &str = "participant-bearer-token-planted-7f3a";
const TOKEN_VAR: &str = "SAGAFLOW_TEST_SHOP_TOKEN";

fn vars() -> sagaflow::defined::Vars {
    Arc::new(|name: &str| match name {
        SECRET_VAR => Some(SECRET.to_string()),
        TOKEN_VAR => Some(TOKEN.to_string()),
        _ => None,
    })
}

async fn start() -> TestServer {
    server::start_with(|config| config.defined.vars = Some(vars())).await
}

/// Reserve stock, charge the card, ship (only when the order needs shipping).
fn order(participant: &Participant) -> Value {
    json!({
        "description": "Reserve stock, charge, ship",
        "input_schema": {
            "type": "object",
            "required": ["order"],
            "properties": {"order": {"type": "object", "required": ["id", "email"],
                                     "properties": {"email": {"type": "string"}}}}
        },
        "subject": "/order/email",
        "endpoints": {"shop": {"base_url": participant.base_url(), "timeout": "5s",
                               "secret_env": SECRET_VAR, "token_env": TOKEN_VAR}},
        "steps": [
            {"name": "reserve-stock",
             "invoke": {"endpoint": "shop", "path": "/stock/reserve"},
             "compensate": {"endpoint": "shop", "path": "/stock/release"},
             "retry": {"max_attempts": 3, "initial_delay": "10ms", "jitter": 0.0}},
            {"name": "charge-card",
             "invoke": {"endpoint": "shop", "path": "/payments/charge"},
             "compensate": {"endpoint": "shop", "path": "/payments/refund"},
             "retry": {"max_attempts": 3, "initial_delay": "10ms", "max_delay": "5s", "jitter": 0.0}},
            {"name": "ship",
             "when": {"pointer": "/input/order/needs_shipping", "equals": true},
             "invoke": {"endpoint": "shop", "path": "/shipments", "timeout": "300ms"},
             "retry": {"max_attempts": 1}}
        ]
    })
}

fn an_order(id: &str, shipping: bool) -> Value {
    json!({"order": {"id": id, "email": format!("{id}@example.com"), "needs_shipping": shipping}})
}

async fn put(server: &TestServer, name: &str, definition: &Value) -> (StatusCode, Value) {
    read(
        server
            .admin(Method::PUT, &format!("/v1/workflow-definitions/{name}"))
            .json(definition)
            .send()
            .await
            .expect("put"),
    )
    .await
}

/// Triggers a run and waits until it is terminal.
async fn run(server: &TestServer, name: &str, input: &Value) -> Value {
    let (status, body) = read(
        server
            .api(Method::POST, &format!("/v1/workflows/{name}/runs?wait_ms=15000"))
            .json(input)
            .send()
            .await
            .expect("trigger"),
    )
    .await;
    assert!(
        status == StatusCode::CREATED || status == StatusCode::OK,
        "{status}: {body}"
    );
    server.wait_terminal(body["id"].as_str().expect("id")).await
}

async fn events(server: &TestServer, run: &str) -> Vec<Value> {
    let (_, body) = read(
        server
            .api(Method::GET, &format!("/v1/runs/{run}/events"))
            .send()
            .await
            .expect("events"),
    )
    .await;
    body["events"].as_array().cloned().unwrap_or_default()
}

/// The invariant checker finds nothing wrong.
async fn assert_no_violations(server: &TestServer) {
    let engine = server.engine();
    assert_eq!(
        sagaflow::check::violations(server.pool(), &engine)
            .await
            .expect("check"),
        []
    );
}

async fn stored_definitions(server: &TestServer) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM workflow_definitions")
        .fetch_one(server.pool())
        .await
        .expect("count")
}

#[tokio::test]
async fn a_defined_saga_runs_its_http_steps_signed_with_outputs_threaded_through() {
    let participant = Participant::start().await;
    let server = start().await;
    let (status, stored) = put(&server, "order", &order(&participant)).await;
    assert_eq!(status, StatusCode::CREATED, "{stored}");
    assert_eq!(
        (stored["name"].as_str(), stored["version"].as_i64()),
        (Some("order"), Some(1))
    );

    let (_, listing) = read(server.api(Method::GET, "/v1/workflows").send().await.expect("list")).await;
    let listed: Vec<&Value> = listing["workflows"]
        .as_array()
        .expect("workflows")
        .iter()
        .filter(|w| w["name"] == "order")
        .collect();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["source"], "defined");
    assert_eq!(
        listed[0]["steps"][0]["calls"],
        "shop POST /stock/reserve; undo: shop POST /stock/release"
    );
    assert!(
        listing["workflows"]
            .as_array()
            .expect("workflows")
            .iter()
            .any(|w| w["name"] == "create-customer-account" && w["source"] == "builtin")
    );

    let input = an_order("o-1", true);
    let done = run(&server, "order", &input).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["subject"], "o-1@example.com");
    let run_id = done["id"].as_str().expect("id");
    assert_eq!(
        participant.paths(),
        ["/stock/reserve", "/payments/charge", "/shipments"]
    );
    // The run's output is the last step's; every step's output is the participant's answer.
    assert_eq!(done["output"], json!({"path": "/saga/shipments", "n": 1}));

    let seen = participant.seen();
    let verifier = standardwebhooks::Webhook::new(SECRET).expect("secret");
    for (request, step) in seen.iter().zip(["reserve-stock", "charge-card", "ship"]) {
        assert_eq!(request.header("idempotency-key"), format!("{run_id}:{step}:invoke"));
        assert_eq!(request.header("sagaflow-run-id"), run_id);
        assert_eq!(request.header("sagaflow-workflow"), "order");
        assert_eq!(request.header("sagaflow-workflow-version"), "1");
        assert_eq!(request.header("sagaflow-step"), step);
        assert_eq!(request.header("sagaflow-phase"), "invoke");
        assert_eq!(request.header("sagaflow-attempt"), "1");
        assert_eq!(request.header("authorization"), format!("Bearer {TOKEN}"));
        assert_eq!(request.header("content-type"), "application/json");
        let deadline = chrono::DateTime::parse_from_rfc3339(&request.header("sagaflow-deadline")).expect("deadline");
        assert!(deadline > chrono::Utc::now() - chrono::Duration::seconds(30));
        let trace = request.header("traceparent");
        let parts: Vec<&str> = trace.split('-').collect();
        assert_eq!(parts.len(), 4, "{trace}");
        assert_eq!(parts[1], run_id.replace('-', ""), "the run is the trace");
        // An independent implementation of Standard Webhooks accepts the signature.
        verifier
            .verify(&request.raw, &request.headers)
            .unwrap_or_else(|e| panic!("{step}: signature refused: {e}"));
        assert_eq!(request.body["input"], input);
    }
    // Outputs so far go to later steps.
    assert_eq!(seen[0].body["steps"], json!({}));
    assert_eq!(
        seen[2].body["steps"],
        json!({
            "reserve-stock": {"output": {"path": "/saga/stock/reserve", "n": 1}},
            "charge-card": {"output": {"path": "/saga/payments/charge", "n": 1}},
        })
    );
    // A tampered body fails the same verifier: the check above can fail.
    let mut tampered = seen[0].raw.to_vec();
    tampered.push(b' ');
    assert!(verifier.verify(&tampered, &seen[0].headers).is_err());

    // The subject feeds the runs list's search like a registration's email.
    let (_, found) = read(
        server
            .api(Method::GET, "/v1/runs?q=o-1@example.com")
            .send()
            .await
            .expect("search"),
    )
    .await;
    assert_eq!(found["runs"][0]["id"], run_id, "{found}");

    // Not shipping: the step is skipped by its `when`.
    let skipped = run(&server, "order", &an_order("o-2", false)).await;
    assert_eq!(skipped["status"], "completed");
    assert_eq!(participant.paths().len(), 5, "{:?}", participant.paths());
    server.stop().await;
}

#[tokio::test]
async fn a_5xx_is_retried_with_the_same_key_after_its_retry_after() {
    let participant = Participant::start().await;
    participant.script(
        "/payments/charge",
        [Answer::Raw(
            503,
            vec![("retry-after", "1".into()), ("content-type", "application/json".into())],
            br#"{"error": {"code": "busy", "message": "try later"}}"#.to_vec(),
        )],
    );
    let server = start().await;
    assert_eq!(put(&server, "order", &order(&participant)).await.0, StatusCode::CREATED);
    let done = run(&server, "order", &an_order("o-3", false)).await;
    assert_eq!(done["status"], "completed", "{done}");
    let charges = participant.seen_at("/payments/charge");
    assert_eq!(charges.len(), 2);
    assert_eq!(
        charges[0].header("idempotency-key"),
        charges[1].header("idempotency-key")
    );
    assert_eq!(
        (
            charges[0].header("sagaflow-attempt"),
            charges[1].header("sagaflow-attempt")
        ),
        ("1".to_string(), "2".to_string())
    );
    // The policy's own delay is 10 ms: the second attempt waited for Retry-After.
    let gap = charges[1].at - charges[0].at;
    assert!(gap >= Duration::from_millis(950), "retried after {gap:?}");
    let log = events(&server, done["id"].as_str().expect("id")).await;
    let failed = log.iter().find(|e| e["kind"] == "step_failed").expect("failure logged");
    assert_eq!(failed["detail"]["attempt"]["status"], 503);
    assert!(
        failed["detail"]["error"]
            .as_str()
            .expect("error")
            .contains("busy: try later")
    );
    server.stop().await;
}

#[tokio::test]
async fn a_4xx_is_permanent_and_compensations_run_in_reverse_with_each_output() {
    let participant = Participant::start().await;
    participant.script(
        "/shipments",
        [Answer::Json(
            422,
            json!({"error": {"code": "no_address", "message": "the order has no address"}, "partial": {"label": "L-1"}}),
        )],
    );
    let server = start().await;
    assert_eq!(put(&server, "order", &order(&participant)).await.0, StatusCode::CREATED);
    let done = run(&server, "order", &an_order("o-4", true)).await;
    assert_eq!(done["status"], "compensated", "{done}");
    assert!(
        done["error"]["message"]
            .as_str()
            .expect("message")
            .contains("no_address"),
        "{done}"
    );
    assert_eq!(
        participant.paths(),
        [
            "/stock/reserve",
            "/payments/charge",
            "/shipments",
            "/payments/refund",
            "/stock/release"
        ]
    );
    let refund = &participant.seen_at("/payments/refund")[0];
    assert_eq!(refund.body["output"], json!({"path": "/saga/payments/charge", "n": 1}));
    assert_eq!(refund.header("sagaflow-phase"), "compensate");
    assert_eq!(
        refund.header("idempotency-key"),
        format!("{}:charge-card:compensate", done["id"].as_str().expect("id"))
    );
    let release = &participant.seen_at("/stock/release")[0];
    assert_eq!(release.body["output"], json!({"path": "/saga/stock/reserve", "n": 1}));

    // The checker agrees, and would see a compensation left undone.
    assert_no_violations(&server).await;
    sqlx::query("UPDATE run_steps SET status = 'succeeded' WHERE run_id = $1 AND name = 'charge-card'")
        .bind(uuid::Uuid::parse_str(done["id"].as_str().expect("id")).expect("uuid"))
        .execute(server.pool())
        .await
        .expect("tamper");
    let found = sagaflow::check::violations(server.pool(), &server.engine())
        .await
        .expect("check");
    assert!(
        found
            .iter()
            .any(|v| v.rule == "compensable-steps-undone" && v.detail.contains("charge-card")),
        "{found:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn the_checker_finds_an_unfinished_run_whose_version_is_gone() {
    let participant = Participant::start().await;
    participant.script(
        "/stock/reserve",
        [Answer::After(
            Duration::from_secs(2),
            Box::new(Answer::Json(200, json!({}))),
        )],
    );
    let server = start().await;
    assert_eq!(put(&server, "order", &order(&participant)).await.0, StatusCode::CREATED);
    let (_, body) = read(
        server
            .api(Method::POST, "/v1/workflows/order/runs")
            .json(&an_order("o-11", false))
            .send()
            .await
            .expect("trigger"),
    )
    .await;
    assert_no_violations(&server).await;
    // As if a version had been deleted by hand under its running run.
    sqlx::query("DELETE FROM workflow_definitions WHERE name = 'order'")
        .execute(server.pool())
        .await
        .expect("delete");
    let found = sagaflow::check::violations(server.pool(), &server.engine())
        .await
        .expect("check");
    assert!(
        found.iter().any(|v| v.rule == "unfinished-runs-have-their-version"
            && v.run_id.map(|r| r.to_string()).as_deref() == body["id"].as_str()),
        "{found:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn timeouts_redirects_oversized_and_non_json_answers_fail_the_step_as_the_contract_says() {
    let participant = Participant::start().await;
    let server = start().await;
    assert_eq!(put(&server, "order", &order(&participant)).await.0, StatusCode::CREATED);
    let cases: Vec<(Answer, &str)> = vec![
        (
            Answer::After(Duration::from_secs(3), Box::new(Answer::Json(200, json!({})))),
            "did not answer within 300ms",
        ),
        (
            Answer::Raw(
                302,
                vec![("location", "http://127.0.0.1:9/elsewhere".into())],
                Vec::new(),
            ),
            "redirects are not followed",
        ),
        (
            Answer::Raw(
                200,
                vec![("content-type", "application/json".into())],
                vec![b' '; 300 * 1024],
            ),
            "over the limit of 262144 bytes",
        ),
        (
            Answer::Raw(200, vec![("content-type", "text/plain".into())], b"shipped!".to_vec()),
            "not JSON",
        ),
    ];
    for (i, (answer, expected)) in cases.into_iter().enumerate() {
        participant.script("/shipments", [answer]);
        let done = run(&server, "order", &an_order(&format!("o-5{i}"), true)).await;
        assert_eq!(done["status"], "compensated", "case {i}: {done}");
        let message = done["error"]["message"].as_str().expect("message");
        assert!(message.contains(expected), "case {i}: {message}");
    }
    // The redirect was not followed: nothing reached its target, each case called once.
    assert_eq!(participant.seen_at("/shipments").len(), 4);
    server.stop().await;
}

#[tokio::test]
async fn an_input_refused_by_the_schema_names_the_field_and_writes_nothing() {
    let participant = Participant::start().await;
    let server = start().await;
    assert_eq!(put(&server, "order", &order(&participant)).await.0, StatusCode::CREATED);
    let before = server.row_counts().await;
    for (input, field) in [
        (json!({"order": {"id": "o-6"}}), "order.email"),
        (json!({"order": {"id": "o-6", "email": 7}}), "order.email"),
        (json!({"basket": {}}), "order"),
    ] {
        let (status, body) = read(
            server
                .api(Method::POST, "/v1/workflows/order/runs")
                .json(&input)
                .send()
                .await
                .expect("trigger"),
        )
        .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert_eq!(body["error"]["field"], field, "{body}");
    }
    assert_eq!(server.row_counts().await, before);
    assert!(participant.seen().is_empty());
    server.stop().await;
}

#[tokio::test]
async fn a_definition_that_cannot_work_is_refused_with_the_field_named_and_nothing_stored() {
    let participant = Participant::start().await;
    let server = start().await;
    type Edit = Box<dyn Fn(&mut Value)>;
    let cases: Vec<(Edit, &str, &str)> = vec![
        (
            Box::new(|d| d["steps"][1]["invoke"]["endpoint"] = json!("bank")),
            "steps[1].invoke.endpoint",
            "unknown endpoint",
        ),
        (
            Box::new(|d| d["steps"][2]["name"] = json!("charge-card")),
            "steps[2].name",
            "two steps",
        ),
        (
            Box::new(|d| d["input_schema"] = json!({"type": "no-such-type"})),
            "input_schema",
            "JSON Schema",
        ),
        (
            Box::new(|d| d["steps"][2]["when"]["pointer"] = json!("/steps/ghost/output")),
            "steps[2].when.pointer",
            "points nowhere",
        ),
        (
            Box::new(|d| d["steps"][0]["retry"]["initial_delay"] = json!("soon")),
            "steps[0].retry.initial_delay",
            "not a duration",
        ),
        (
            Box::new(|d| d["endpoints"]["shop"]["secret_env"] = json!("SAGAFLOW_TEST_UNSET_SECRET")),
            "endpoints.shop.secret_env",
            "SAGAFLOW_TEST_UNSET_SECRET is not set",
        ),
        (
            Box::new(|d| d["endpoints"]["shop"]["base_url"] = json!("http://example.com/saga")),
            "endpoints.shop.base_url",
            "only to loopback",
        ),
        (
            Box::new(|d| d["steps"][0]["invoke"]["method"] = json!("GET")),
            "steps[0].invoke.method",
            "unknown field",
        ),
    ];
    for (edit, field, message) in cases {
        let mut definition = order(&participant);
        edit(&mut definition);
        let (status, body) = put(&server, "order", &definition).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{field}: {body}");
        assert_eq!(body["error"]["field"], field, "{body}");
        assert!(
            body["error"]["message"].as_str().expect("message").contains(message),
            "{body}"
        );
    }
    // A built-in workflow's name is taken.
    let (status, body) = put(&server, "create-customer-account", &order(&participant)).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    // A name the engine cannot take.
    let (status, body) = put(&server, "Order_1", &order(&participant)).await;
    assert_eq!(
        (status, body["error"]["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("name")),
        "{body}"
    );
    // Over 64 KiB.
    let mut big = order(&participant);
    big["description"] = json!("x".repeat(70 * 1024));
    let (status, body) = put(&server, "order", &big).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert!(
        body["error"]["message"].as_str().expect("message").contains("65536"),
        "{body}"
    );
    // The API token cannot define workflows.
    let refused = server
        .api(Method::PUT, "/v1/workflow-definitions/order")
        .json(&order(&participant))
        .send()
        .await
        .expect("put");
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    assert_eq!(stored_definitions(&server).await, 0);
    let (status, _) = read(
        server
            .api(Method::GET, "/v1/workflows/order")
            .send()
            .await
            .expect("get"),
    )
    .await;
    assert_ne!(status, StatusCode::OK);
    server.stop().await;
}

#[tokio::test]
async fn versions_follow_content_and_each_run_finishes_on_its_own_version() {
    let participant = Participant::start().await;
    // The first run's charge is held until the second version is stored and used.
    participant.script(
        "/payments/charge",
        [Answer::After(
            Duration::from_millis(1500),
            Box::new(Answer::Json(200, json!({"v": 1}))),
        )],
    );
    let server = start().await;
    let v1 = order(&participant);
    assert_eq!(put(&server, "order", &v1).await.0, StatusCode::CREATED);
    // The same content, keys reordered: the same version, 200.
    let reordered: Value = serde_json::from_str(&serde_json::to_string(&v1).expect("json")).expect("json");
    let (status, same) = put(&server, "order", &reordered).await;
    assert_eq!((status, same["version"].as_i64()), (StatusCode::OK, Some(1)));

    let first = read(
        server
            .api(Method::POST, "/v1/workflows/order/runs")
            .json(&an_order("o-7", false))
            .send()
            .await
            .expect("trigger"),
    )
    .await
    .1;
    let first_id = first["id"].as_str().expect("id").to_string();
    common::eventually(Duration::from_secs(10), "the first charge to be in flight", || async {
        (!participant.seen_at("/payments/charge").is_empty()).then_some(())
    })
    .await;

    let mut v2 = v1.clone();
    v2["description"] = json!("Reserve stock, charge, ship (v2)");
    let (status, stored) = put(&server, "order", &v2).await;
    assert_eq!((status, stored["version"].as_i64()), (StatusCode::CREATED, Some(2)));
    let (_, versions) = read(
        server
            .api(Method::GET, "/v1/workflow-definitions/order/versions")
            .send()
            .await
            .expect("versions"),
    )
    .await;
    assert_eq!(versions["versions"][0]["version"], 2);
    assert_eq!(versions["versions"][1]["unfinished_runs"], 1, "{versions}");
    // Deleting a version with an unfinished run is refused.
    let refused = server
        .admin(Method::DELETE, "/v1/workflow-definitions/order/versions/1")
        .send()
        .await
        .expect("delete");
    assert_eq!(refused.status(), StatusCode::CONFLICT);

    let second = run(&server, "order", &an_order("o-8", false)).await;
    assert_eq!(
        (second["status"].as_str(), second["workflow_version"].as_i64()),
        (Some("completed"), Some(2)),
        "{second}"
    );
    let first = server.wait_terminal(&first_id).await;
    assert_eq!(
        (first["status"].as_str(), first["workflow_version"].as_i64()),
        (Some("completed"), Some(1)),
        "{first}"
    );
    let versions_seen: Vec<String> = participant
        .seen_at("/payments/charge")
        .iter()
        .map(|s| s.header("sagaflow-workflow-version"))
        .collect();
    assert_eq!(versions_seen, ["1", "2"]);

    let (status, old) = read(
        server
            .api(Method::GET, "/v1/workflow-definitions/order?version=1")
            .send()
            .await
            .expect("get"),
    )
    .await;
    assert_eq!(
        (status, old["description"].as_str()),
        (StatusCode::OK, Some("Reserve stock, charge, ship"))
    );
    let deleted = server
        .admin(Method::DELETE, "/v1/workflow-definitions/order/versions/1")
        .send()
        .await
        .expect("delete");
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    let gone = server
        .api(Method::GET, "/v1/workflow-definitions/order?version=1")
        .send()
        .await
        .expect("get");
    assert_eq!(gone.status(), StatusCode::NOT_FOUND);
    server.stop().await;
}

#[tokio::test]
async fn an_instance_started_after_a_definition_was_stored_runs_it() {
    let participant = Participant::start().await;
    // The first instance has no worker: only the second can run the workflow.
    let first = server::start_with(|config| {
        config.defined.vars = Some(vars());
        config.run_worker = false;
    })
    .await;
    assert_eq!(put(&first, "order", &order(&participant)).await.0, StatusCode::CREATED);
    let mut config = server::config_for(&first.db.url);
    config.engine.node_id = "second".into();
    config.defined.vars = Some(vars());
    let second = sagaflow::server::start(config).await.expect("second instance");
    let client = reqwest::Client::new();
    let (status, body) = read(
        client
            .post(format!("http://{}/v1/workflows/order/runs?wait_ms=15000", second.addr))
            .bearer_auth(server::API_TOKEN)
            .json(&an_order("o-9", false))
            .send()
            .await
            .expect("trigger"),
    )
    .await;
    assert!(status.is_success(), "{status}: {body}");
    assert_eq!(body["status"], "completed", "{body}");
    // Triggered on the first instance (no worker), it is run by the second.
    let (status, body) = read(
        first
            .api(Method::POST, "/v1/workflows/order/runs")
            .json(&an_order("o-9b", false))
            .send()
            .await
            .expect("trigger"),
    )
    .await;
    assert_triggered(status, &body);
    let done = first.wait_terminal(body["id"].as_str().expect("id")).await;
    assert_eq!(done["status"], "completed");
    second.shutdown().await;
    first.stop().await;
}

#[tokio::test]
async fn secrets_never_reach_the_database_or_the_api() {
    let participant = Participant::start().await;
    participant.script(
        "/payments/charge",
        [Answer::Json(500, json!({"error": {"message": "boom"}}))],
    );
    let server = start().await;
    assert_eq!(put(&server, "order", &order(&participant)).await.0, StatusCode::CREATED);
    let done = run(&server, "order", &an_order("o-10", false)).await;
    assert_eq!(done["status"], "completed");
    let run_id = done["id"].as_str().expect("id");
    let key = SECRET.trim_start_matches("whsec_");
    // The database: every table, as text.
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' AND tablename <> '_sqlx_migrations'",
    )
    .fetch_all(server.pool())
    .await
    .expect("tables");
    assert!(tables.contains(&"workflow_definitions".to_string()));
    for table in tables {
        let dump: Option<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT string_agg(t::text, ' ') FROM {table} t"
        )))
        .fetch_one(server.pool())
        .await
        .expect("dump");
        let dump = dump.unwrap_or_default();
        for planted in [key, TOKEN] {
            assert!(!dump.contains(planted), "{table} holds a secret");
        }
    }
    // The API: the definition, the workflow list, the run and its log.
    for path in [
        "/v1/workflow-definitions/order".to_string(),
        "/v1/workflows".to_string(),
        format!("/v1/runs/{run_id}"),
        format!("/v1/runs/{run_id}/events"),
    ] {
        let text = server
            .admin(Method::GET, &path)
            .send()
            .await
            .expect("get")
            .text()
            .await
            .expect("text");
        assert!(
            text.contains(SECRET_VAR) || !path.contains("definitions"),
            "{path} names the variable"
        );
        for planted in [key, TOKEN] {
            assert!(!text.contains(planted), "{path} shows a secret");
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn a_workflows_file_is_upserted_at_every_start_and_a_bad_one_stops_the_server() {
    let participant = Participant::start().await;
    let dir = std::env::temp_dir().join(format!("sagaflow-workflows-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("workflows.json");
    std::fs::write(&file, json!({"order": order(&participant)}).to_string()).expect("write");
    let first = server::start_with(|config| {
        config.defined.vars = Some(vars());
        config.defined.file = Some(file.clone());
    })
    .await;
    let done = run(&first, "order", &an_order("o-12", false)).await;
    assert_eq!(
        (done["status"].as_str(), done["workflow_version"].as_i64()),
        (Some("completed"), Some(1))
    );
    let url = first.db.url.clone();
    // The same file again: still version 1.
    let mut config = server::config_for(&url);
    config.defined.vars = Some(vars());
    config.defined.file = Some(file.clone());
    let again = sagaflow::server::start(config).await.expect("restart");
    assert_eq!(
        again
            .engine
            .workflows()
            .iter()
            .filter(|w| w.name() == "order")
            .map(|w| w.version())
            .collect::<Vec<_>>(),
        [1]
    );
    again.shutdown().await;
    // A file with a definition that cannot work stops the server, naming the field.
    let mut bad = order(&participant);
    bad["steps"][0]["invoke"]["endpoint"] = json!("bank");
    std::fs::write(&file, json!({"order": bad}).to_string()).expect("write");
    let mut config = server::config_for(&url);
    config.defined.vars = Some(vars());
    config.defined.file = Some(file.clone());
    let error = sagaflow::server::start(config).await.err().expect("refused");
    assert!(error.to_string().contains("order.steps[0].invoke.endpoint"), "{error}");
    first.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn secrets_never_reach_the_log() {
    use common::process::{Options, ServerProcess};
    let participant = Participant::start().await;
    participant.script(
        "/payments/charge",
        [Answer::Json(500, json!({"error": {"message": "boom"}}))],
    );
    let db = common::test_db().await;
    let server = ServerProcess::start(
        &db.url,
        Options {
            env: vec![
                (SECRET_VAR.to_string(), SECRET.to_string()),
                (TOKEN_VAR.to_string(), TOKEN.to_string()),
                (
                    "RUST_LOG".to_string(),
                    "debug,sqlx=warn,hyper=warn,reqwest=warn".to_string(),
                ),
            ],
            ..Options::node("secret-keeper")
        },
    )
    .await;
    let client = reqwest::Client::new();
    let stored = client
        .put(format!("{}/v1/workflow-definitions/order", server.url()))
        .bearer_auth(server::ADMIN_TOKEN)
        .json(&order(&participant))
        .send()
        .await
        .expect("put");
    assert_eq!(stored.status(), StatusCode::CREATED);
    let (status, body) = read(
        client
            .post(format!("{}/v1/workflows/order/runs?wait_ms=15000", server.url()))
            .bearer_auth(server::API_TOKEN)
            .json(&an_order("o-13", false))
            .send()
            .await
            .expect("trigger"),
    )
    .await;
    assert!(status.is_success(), "{body}");
    assert_eq!(body["status"], "completed", "{body}");
    let log = server.log_text();
    assert!(
        log.contains("charge-card"),
        "the log is the server's, with its steps: {log}"
    );
    for planted in [SECRET.trim_start_matches("whsec_"), TOKEN] {
        assert!(!log.contains(planted), "the log shows a secret");
    }
}

#[tokio::test]
async fn a_request_over_its_limit_fails_the_step_naming_the_limit() {
    let participant = Participant::start().await;
    // Each answer is just under the 256 KiB answer limit; five of them make the sixth
    // step's request (the input and the outputs so far) larger than 1 MiB.
    let big = json!({"blob": "x".repeat(255_000)});
    let steps: Vec<Value> = (1..=6)
        .map(|i| {
            participant.script(&format!("/s{i}"), [Answer::Json(200, big.clone())]);
            json!({"name": format!("s{i}"), "invoke": {"endpoint": "shop", "path": format!("/s{i}")}})
        })
        .collect();
    let definition = json!({
        "endpoints": {"shop": {"base_url": participant.base_url()}},
        "steps": steps,
    });
    let server = start().await;
    assert_eq!(put(&server, "heavy", &definition).await.0, StatusCode::CREATED);
    let done = run(&server, "heavy", &json!({"n": 1})).await;
    assert_eq!(done["status"], "compensated", "{}", done["error"]);
    let message = done["error"]["message"].as_str().expect("message");
    assert!(message.contains("over the limit of 1048576 bytes"), "{message}");
    assert_eq!(done["error"]["step"], "s6");
    assert_eq!(participant.seen_at("/s6").len(), 0, "nothing over the limit is sent");
    server.stop().await;
}

#[tokio::test]
async fn a_call_that_may_have_acted_is_compensated_one_that_never_connected_is_not() {
    let participant = Participant::start().await;
    participant.script(
        "/hold",
        [Answer::After(
            Duration::from_secs(2),
            Box::new(Answer::Json(200, json!({}))),
        )],
    );
    participant.script(
        "/boom",
        [Answer::Json(500, json!({"error": {"message": "crashed midway"}}))],
    );
    // Nobody listens there: a connection is refused before anything is sent.
    let dead = format!("http://127.0.0.1:{}/saga", common::process::free_port());
    let step = |name: &str, endpoint: &str| {
        json!({"name": name,
               "invoke": {"endpoint": endpoint, "path": format!("/{name}"), "timeout": "300ms"},
               "compensate": {"endpoint": "shop", "path": format!("/{name}/undo")},
               "retry": {"max_attempts": 1}})
    };
    let definition = |failing: Value| {
        json!({
            "endpoints": {"shop": {"base_url": participant.base_url()}, "dead": {"base_url": dead}},
            "steps": [step("first", "shop"), failing],
        })
    };
    let server = start().await;
    for (case, (name, failing, undone, why)) in [
        ("timed-out", step("hold", "shop"), true, "the call timed out"),
        (
            "server-error",
            step("boom", "shop"),
            true,
            "the participant failed while handling the call",
        ),
        ("refused", step("gone", "dead"), false, ""),
    ]
    .into_iter()
    .enumerate()
    {
        assert_eq!(
            put(&server, name, &definition(failing.clone())).await.0,
            StatusCode::CREATED
        );
        let done = run(&server, name, &json!({"case": name})).await;
        assert_eq!(done["status"], "compensated", "{name}: {done}");
        let failed_step = failing["name"].as_str().expect("name").to_string();
        let undo = participant.seen_at(&format!("/{failed_step}/undo"));
        if undone {
            assert_eq!(undo.len(), 1, "{name}: the step that may have acted is undone");
            assert_eq!(undo[0].body["partial"], json!({"outcome_unknown": why}), "{name}");
        } else {
            assert!(undo.is_empty(), "{name}: nothing was sent, nothing is undone");
        }
        assert_eq!(
            participant.seen_at("/first/undo").len(),
            case + 1,
            "{name}: the step before is undone"
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn a_compensated_defined_run_is_retried_as_a_new_linked_run() {
    let participant = Participant::start().await;
    participant.script(
        "/payments/charge",
        [Answer::Json(
            409,
            json!({"error": {"code": "card_locked", "message": "try again later"}}),
        )],
    );
    let server = start().await;
    assert_eq!(put(&server, "order", &order(&participant)).await.0, StatusCode::CREATED);
    let failed = run(&server, "order", &an_order("o-14", false)).await;
    assert_eq!(failed["status"], "compensated", "{failed}");
    let failed_id = failed["id"].as_str().expect("id");
    let (status, retried) = read(
        server
            .admin(Method::POST, &format!("/v1/runs/{failed_id}/retry"))
            .send()
            .await
            .expect("retry"),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{retried}");
    let done = server.wait_terminal(retried["id"].as_str().expect("id")).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["retry_of"], failed_id);
    assert_eq!(done["input"], failed["input"]);
    let charges = participant.seen_at("/payments/charge");
    assert_eq!(charges.len(), 2);
    assert_ne!(
        charges[0].header("idempotency-key"),
        charges[1].header("idempotency-key"),
        "a new run is a new call, with a key of its own"
    );
    server.stop().await;
}

/// Reserve stock, wait for the payment's signal, capture asynchronously (answered 202,
/// completed later), then a sleep until the input's moment.
fn waiting_order(participant: &Participant, wait: &str) -> Value {
    json!({
        "description": "Reserve, wait for payment, capture",
        "subject": "/order/email",
        "endpoints": {"shop": {"base_url": participant.base_url(), "timeout": "5s"}},
        "steps": [
            {"name": "reserve-stock",
             "invoke": {"endpoint": "shop", "path": "/stock/reserve"},
             "compensate": {"endpoint": "shop", "path": "/stock/release"}},
            {"name": "await-payment",
             "wait": {"signal": "payment.succeeded", "timeout": wait, "on_timeout": "fail"}},
            {"name": "capture",
             "invoke": {"endpoint": "shop", "path": "/capture"},
             "compensate": {"endpoint": "shop", "path": "/refund"},
             "async": {"timeout": "1h", "heartbeat_timeout": "30s"}},
            {"name": "settle", "sleep_until": {"pointer": "/order/settle_at"}}
        ]
    })
}

async fn waiting_for(server: &TestServer, run: &str, kind: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (_, body) = read(
            server
                .api(Method::GET, &format!("/v1/runs/{run}"))
                .send()
                .await
                .expect("get"),
        )
        .await;
        if body["waiting"]["kind"] == kind {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "run {run} is not waiting for a {kind}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn post(server: &TestServer, path: &str, key: Option<&str>, body: Value) -> (StatusCode, Value) {
    let mut request = server.api(Method::POST, path).json(&body);
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    read(request.send().await.expect("post")).await
}

#[tokio::test]
async fn a_defined_order_waits_for_its_signal_and_an_asynchronous_completion() {
    let participant = Participant::start().await;
    participant.script("/capture", [Answer::Json(202, json!({"ticket": "cap-1"}))]);
    let server = start().await;
    assert_eq!(
        put(&server, "order-waits", &waiting_order(&participant, "30m")).await.0,
        StatusCode::CREATED
    );
    let settle_at = (chrono::Utc::now() - chrono::Duration::minutes(1)).to_rfc3339();
    let input = json!({"order": {"id": "o-1", "email": "o-1@example.com", "settle_at": settle_at}});
    let (status, created) = read(
        server
            .api(Method::POST, "/v1/workflows/order-waits/runs")
            .header("idempotency-key", "order-1")
            .json(&input)
            .send()
            .await
            .expect("trigger"),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let run = created["id"].as_str().expect("id").to_string();

    let waiting = waiting_for(&server, &run, "signal").await;
    assert_eq!(waiting["status"], "running");
    assert_eq!(waiting["waiting"]["name"], "payment.succeeded");
    assert_eq!(waiting["waiting"]["step"], "await-payment");
    assert!(waiting["waiting"]["deadline"].is_string());
    assert_eq!(waiting["steps"][1]["status"], "running");

    // Refusals first: none of them changes anything.
    let undeclared = post(
        &server,
        &format!("/v1/runs/{run}/signals/payment.failed"),
        None,
        json!({}),
    )
    .await;
    assert_eq!(
        (undeclared.0, undeclared.1["error"]["code"].clone()),
        (StatusCode::CONFLICT, json!("unknown_signal"))
    );
    let nobody = post(
        &server,
        &format!("/v1/runs/{}/signals/payment.succeeded", uuid::Uuid::now_v7()),
        None,
        json!({}),
    )
    .await;
    assert_eq!(nobody.0, StatusCode::NOT_FOUND);
    let bad_key = post(
        &server,
        "/v1/workflows/order-waits/runs/by-key/no-such-order/signals/payment.succeeded",
        None,
        json!({}),
    )
    .await;
    assert_eq!(bad_key.0, StatusCode::NOT_FOUND, "{}", bad_key.1);
    let too_big = server
        .api(Method::POST, &format!("/v1/runs/{run}/signals/payment.succeeded"))
        .header("content-type", "application/json")
        .body(format!("{{\"pad\": \"{}\"}}", "x".repeat(70 * 1024)))
        .send()
        .await
        .expect("post");
    assert_eq!(too_big.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let garbage = server
        .api(Method::POST, &format!("/v1/runs/{run}/signals/payment.succeeded"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .expect("post");
    assert_eq!(garbage.status(), StatusCode::BAD_REQUEST);
    let kept: i64 = sqlx::query_scalar("SELECT count(*) FROM run_inbox")
        .fetch_one(server.pool())
        .await
        .expect("count");
    assert_eq!(kept, 0);

    // The payment provider's webhook knows the order, not the run; it delivers twice.
    let by_key = "/v1/workflows/order-waits/runs/by-key/order-1/signals/payment.succeeded";
    let (status, first) = post(&server, by_key, Some("evt_1"), json!({"amount": 500})).await;
    assert_eq!(
        (status, first["delivered"].clone()),
        (StatusCode::ACCEPTED, json!("now")),
        "{first}"
    );
    let (status, again) = post(&server, by_key, Some("evt_1"), json!({"amount": 500})).await;
    assert_eq!(
        (status, again["delivered"].clone(), again["id"].clone()),
        (StatusCode::OK, json!("duplicate"), first["id"].clone())
    );

    // The capture answered 202: the step waits for its completion.
    let waiting = waiting_for(&server, &run, "completion").await;
    assert_eq!(waiting["waiting"]["name"], "capture");
    assert_eq!(
        waiting["steps"][1]["output"],
        json!({"amount": 500}),
        "the payload is the wait's output"
    );
    let call = &participant.seen_at("/capture")[0];
    assert_eq!(call.body["steps"]["await-payment"]["output"], json!({"amount": 500}));
    let attempt = call.header("sagaflow-attempt");
    assert_eq!(attempt, "1");
    let complete = format!("/v1/runs/{run}/steps/capture/complete");
    let beat = format!("/v1/runs/{run}/steps/capture/heartbeat");
    let garbled = read(
        server
            .api(Method::POST, &beat)
            .header("content-type", "application/json")
            .body("{not json")
            .send()
            .await
            .expect("heartbeat"),
    )
    .await;
    assert_eq!(
        (garbled.0, garbled.1["error"]["code"].clone()),
        (StatusCode::BAD_REQUEST, json!("malformed_json"))
    );
    let unnamed = read(server.api(Method::POST, &beat).send().await.expect("heartbeat")).await;
    assert_eq!(
        (unnamed.0, unnamed.1["error"]["field"].clone()),
        (StatusCode::UNPROCESSABLE_ENTITY, json!("attempt"))
    );
    let stale = post(&server, &beat, None, json!({"attempt": 3})).await;
    assert_eq!(
        (stale.0, stale.1["error"]["code"].clone()),
        (StatusCode::CONFLICT, json!("stale_attempt"))
    );
    let heartbeat = read(
        server
            .api(Method::POST, &format!("/v1/runs/{run}/steps/capture/heartbeat"))
            .header("sagaflow-attempt", &attempt)
            .send()
            .await
            .expect("heartbeat"),
    )
    .await;
    assert_eq!(heartbeat.0, StatusCode::OK, "{}", heartbeat.1);
    assert!(heartbeat.1["deadline"].is_string());
    let unnamed = post(&server, &complete, None, json!({"output": {}})).await;
    assert_eq!(
        (unnamed.0, unnamed.1["error"]["field"].clone()),
        (StatusCode::UNPROCESSABLE_ENTITY, json!("attempt"))
    );
    let stale = post(&server, &complete, None, json!({"attempt": 2, "output": {}})).await;
    assert_eq!(
        (stale.0, stale.1["error"]["code"].clone()),
        (StatusCode::CONFLICT, json!("stale_attempt"))
    );
    let both = post(
        &server,
        &complete,
        None,
        json!({"attempt": 1, "output": {}, "error": {"message": "x"}}),
    )
    .await;
    assert_eq!(both.0, StatusCode::UNPROCESSABLE_ENTITY);
    let not_async = post(
        &server,
        &format!("/v1/runs/{run}/steps/reserve-stock/complete"),
        None,
        json!({"attempt": 1, "output": {}}),
    )
    .await;
    assert_eq!(
        (not_async.0, not_async.1["error"]["code"].clone()),
        (StatusCode::CONFLICT, json!("not_asynchronous"))
    );
    let (status, done) = post(
        &server,
        &complete,
        None,
        json!({"attempt": 1, "output": {"captured": 500}}),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{done}");

    let finished = server.wait_terminal(&run).await;
    assert_eq!(finished["status"], "completed", "{finished}");
    assert_eq!(finished["steps"][2]["output"], json!({"captured": 500}));
    assert!(finished.get("waiting").is_none());
    let kinds: Vec<String> = events(&server, &run)
        .await
        .iter()
        .filter_map(|e| e["kind"].as_str().map(str::to_string))
        .collect();
    for kind in ["step_waiting", "signal_received", "step_completed_externally"] {
        assert!(kinds.iter().any(|k| k == kind), "{kind} not in {kinds:?}");
    }
    // The sleep until a moment already passed ended at once.
    assert_eq!(finished["steps"][3]["status"], "succeeded");
    let after = post(
        &server,
        &format!("/v1/runs/{run}/signals/payment.succeeded"),
        None,
        json!({}),
    )
    .await;
    assert_eq!(
        (after.0, after.1["error"]["code"].clone()),
        (StatusCode::CONFLICT, json!("run_finished"))
    );
    assert_no_violations(&server).await;
    server.stop().await;
}

#[tokio::test]
async fn a_defined_wait_past_its_deadline_fails_and_the_saga_compensates() {
    let participant = Participant::start().await;
    let server = start().await;
    assert_eq!(
        put(&server, "order-waits", &waiting_order(&participant, "1s")).await.0,
        StatusCode::CREATED
    );
    let input =
        json!({"order": {"id": "o-2", "email": "o-2@example.com", "settle_at": chrono::Utc::now().to_rfc3339()}});
    let done = run(&server, "order-waits", &input).await;
    assert_eq!(done["status"], "compensated", "{done}");
    assert_eq!(done["error"]["step"], "await-payment");
    assert_eq!(
        participant.paths(),
        ["/stock/reserve", "/stock/release"],
        "nothing was captured"
    );
    let kinds: Vec<String> = events(&server, done["id"].as_str().expect("id"))
        .await
        .iter()
        .filter_map(|e| e["kind"].as_str().map(str::to_string))
        .collect();
    assert!(kinds.iter().any(|k| k == "wait_timed_out"), "{kinds:?}");
    server.stop().await;
}

#[tokio::test]
async fn a_definition_whose_waits_cannot_work_is_refused_naming_the_field() {
    let participant = Participant::start().await;
    let server = start().await;
    let base = waiting_order(&participant, "30m");
    type Edit = Box<dyn Fn(&mut Value)>;
    let cases: Vec<(Edit, &str)> = vec![
        (
            Box::new(|d| d["steps"][1]["wait"] = json!({"signal": "payment.succeeded"})),
            "steps[1].wait.timeout",
        ),
        (
            Box::new(|d| d["steps"][1]["wait"]["timeout"] = json!("40days")),
            "steps[1].wait.timeout",
        ),
        (
            Box::new(|d| d["steps"][1]["wait"]["timeout"] = json!("soon")),
            "steps[1].wait.timeout",
        ),
        (
            Box::new(|d| d["steps"][1]["wait"]["signal"] = json!("")),
            "steps[1].wait.signal",
        ),
        (
            Box::new(|d| d["steps"][1]["wait"]["on_timeout"] = json!("retry")),
            "steps[1].wait.on_timeout",
        ),
        (
            Box::new(|d| d["steps"][1]["compensate"] = json!({"endpoint": "shop", "path": "/x"})),
            "steps[1].compensate",
        ),
        (
            Box::new(|d| d["steps"][1]["invoke"] = json!({"endpoint": "shop", "path": "/x"})),
            "steps[1]",
        ),
        (
            Box::new(|d| d["steps"][2]["async"] = json!({"heartbeat_timeout": "1m"})),
            "steps[2].async.timeout",
        ),
        (
            Box::new(|d| d["steps"][2]["async"]["heartbeat_timeout"] = json!("2h")),
            "steps[2].async.heartbeat_timeout",
        ),
        (
            Box::new(|d| d["steps"][3]["sleep_until"]["pointer"] = json!("order.settle_at")),
            "steps[3].sleep_until.pointer",
        ),
        (
            Box::new(|d| d["steps"][3] = json!({"name": "settle", "sleep": "0s"})),
            "steps[3].sleep",
        ),
        (
            Box::new(|d| d["steps"][3] = json!({"name": "settle"})),
            "steps[3].invoke",
        ),
    ];
    for (edit, field) in cases {
        let mut definition = base.clone();
        edit(&mut definition);
        let (status, body) = put(&server, "order-waits", &definition).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{field}: {body}");
        assert_eq!(body["error"]["field"], field, "{body}");
    }
    assert_eq!(
        stored_definitions(&server).await,
        0,
        "a refused definition stores nothing"
    );
    // A sleep until a moment the input lacks is refused at trigger, naming the field.
    assert_eq!(put(&server, "order-waits", &base).await.0, StatusCode::CREATED);
    let (status, body) = read(
        server
            .api(Method::POST, "/v1/workflows/order-waits/runs")
            .json(&json!({"order": {"id": "o-3", "email": "o-3@example.com", "settle_at": "next week"}}))
            .send()
            .await
            .expect("trigger"),
    )
    .await;
    assert_eq!(
        (status, body["error"]["field"].clone()),
        (StatusCode::UNPROCESSABLE_ENTITY, json!("order.settle_at")),
        "{body}"
    );
    server.stop().await;
}

/// Reads one sample of a gauge from the metrics text (`name{labels} value`).
fn gauge(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn a_thousand_waiting_runs_hold_no_worker_slot_and_no_connection() {
    use futures::StreamExt;
    let participant = Participant::start().await;
    let server = start().await;
    let definition = json!({
        "endpoints": {"shop": {"base_url": participant.base_url()}},
        "steps": [{"name": "await-payment", "wait": {"signal": "payment.succeeded", "timeout": "1h"}}]
    });
    assert_eq!(put(&server, "patient", &definition).await.0, StatusCode::CREATED);
    // What the idle instance holds itself: its LISTEN connections (the worker's and the
    // scheduler's wake-ups, the definitions' announcements), one each for its life.
    let idle = |metrics: &str| {
        let read = |series: &str| gauge(metrics, series).unwrap_or_else(|| panic!("no {series} in {metrics}"));
        (
            read("sagaflow_worker_slots_busy"),
            read("sagaflow_db_connections_busy{pool=\"worker\"}"),
            read("sagaflow_db_connections_busy{pool=\"api\"}"),
        )
    };
    // The idle instance's own, once its start and the PUT have given back what they used:
    // the lowest reading over a second.
    let mut baseline = idle(&server.metrics().await);
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = idle(&server.metrics().await);
        baseline = (baseline.0.min(now.0), baseline.1.min(now.1), baseline.2.min(now.2));
    }
    assert_eq!(baseline.0, 0.0);
    let ids: Vec<String> = futures::stream::iter(0..1000)
        .map(|i| {
            let request = server
                .api(Method::POST, "/v1/workflows/patient/runs")
                .json(&json!({"n": i}));
            async move {
                let (status, body) = read(request.send().await.expect("trigger")).await;
                assert_eq!(status, StatusCode::CREATED, "{body}");
                body["id"].as_str().expect("id").to_string()
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let waiting: i64 =
            sqlx::query_scalar("SELECT count(*) FROM runs WHERE wait_kind IS NOT NULL AND lease_owner IS NULL")
                .fetch_one(server.pool())
                .await
                .expect("count");
        if waiting == 1000 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{waiting} of 1000 runs wait");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Every run waits: no executor is left holding a slot, and the pools are back to what
    // the idle instance held (a heartbeat or a recovery pass may hold one for a moment, so
    // look until they are).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = idle(&server.metrics().await);
        if now == baseline {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "with 1000 runs waiting (slots, worker, api connections) are {now:?}, idle {baseline:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // And each goes on once its signal arrives.
    futures::stream::iter(ids.iter())
        .map(|id| {
            let request = server
                .api(Method::POST, &format!("/v1/runs/{id}/signals/payment.succeeded"))
                .json(&json!({"paid": true}));
            async move {
                let (status, body) = read(request.send().await.expect("signal")).await;
                assert_eq!(status, StatusCode::ACCEPTED, "{body}");
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<()>>()
        .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let completed: i64 = sqlx::query_scalar("SELECT count(*) FROM runs WHERE status = 'completed'")
            .fetch_one(server.pool())
            .await
            .expect("count");
        if completed == 1000 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{completed} of 1000 completed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.stop().await;
}

#[tokio::test]
async fn a_compensation_that_gave_up_is_resolved_by_hand_over_http_and_the_run_ends_compensated() {
    let participant = Participant::start().await;
    participant.script(
        "/payments/charge",
        [Answer::Json(
            422,
            json!({"error": {"code": "card_declined", "message": "declined"}}),
        )],
    );
    participant.script(
        "/stock/release",
        [Answer::Json(
            422,
            json!({"error": {"message": "the warehouse lost the reservation"}}),
        )],
    );
    let server = start().await;
    assert_eq!(put(&server, "order", &order(&participant)).await.0, StatusCode::CREATED);
    let failed = run(&server, "order", &an_order("o-9", false)).await;
    assert_eq!(failed["status"], "failed", "{failed}");
    assert_eq!(failed["steps"][0]["status"], "compensation_failed");
    let id = failed["id"].as_str().expect("id").to_string();
    let resolve = |step: &str| format!("/v1/runs/{id}/steps/{step}/resolve");
    let refusals = [
        (
            server
                .api(Method::POST, &resolve("reserve-stock"))
                .json(&json!({"note": "x"})),
            StatusCode::FORBIDDEN,
            None,
        ),
        (
            server.admin(Method::POST, &resolve("reserve-stock")).json(&json!({})),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("note"),
        ),
        (
            server
                .admin(Method::POST, &resolve("reserve-stock"))
                .json(&json!({"note": "  "})),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("note"),
        ),
        (
            server
                .admin(Method::POST, &resolve("charge-card"))
                .json(&json!({"note": "x"})),
            StatusCode::CONFLICT,
            None,
        ),
        (
            server.admin(Method::POST, &resolve("nope")).json(&json!({"note": "x"})),
            StatusCode::NOT_FOUND,
            None,
        ),
    ];
    for (request, expected, field) in refusals {
        let (status, body) = read(request.send().await.expect("resolve")).await;
        assert_eq!(status, expected, "{body}");
        if let Some(field) = field {
            assert_eq!(body["error"]["field"], field, "{body}");
        }
    }
    let (status, body) = read(
        server
            .admin(Method::POST, &resolve("reserve-stock"))
            .header("x-sagaflow-operator", "ada@ops")
            .json(&json!({"note": "released the reservation by hand in the warehouse system"}))
            .send()
            .await
            .expect("resolve"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let done = server.wait_terminal(&id).await;
    assert_eq!(done["status"], "compensated", "{done}");
    assert_eq!(done["steps"][0]["status"], "compensated");
    assert_eq!(done["error"]["step"], "charge-card", "the original error is kept");
    let resolved: Vec<Value> = events(&server, &id)
        .await
        .into_iter()
        .filter(|e| e["kind"] == "step_resolved_by_hand")
        .collect();
    assert_eq!(resolved.len(), 1);
    assert_eq!(resolved[0]["detail"]["by"], "ada@ops");
    assert_eq!(
        resolved[0]["detail"]["note"],
        "released the reservation by hand in the warehouse system"
    );
    let (status, body) = read(
        server
            .admin(Method::POST, &resolve("reserve-stock"))
            .json(&json!({"note": "again"}))
            .send()
            .await
            .expect("resolve"),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (StatusCode::CONFLICT, json!("not_allowed"))
    );
    assert_no_violations(&server).await;
    server.stop().await;
}

#[tokio::test]
async fn a_bulk_retry_of_500_compensated_runs_after_an_outage_and_a_bulk_cancel_of_waiting_ones() {
    use futures::StreamExt;
    let participant = Participant::start().await;
    // The outage: the first 500 charges are refused; after it, every charge succeeds.
    participant.script(
        "/charge",
        (0..500).map(|_| Answer::Json(422, json!({"error": {"message": "down"}}))),
    );
    let server = start().await;
    let flaky = json!({
        "endpoints": {"shop": {"base_url": participant.base_url()}},
        "steps": [{"name": "charge", "invoke": {"endpoint": "shop", "path": "/charge"}}]
    });
    assert_eq!(put(&server, "flaky", &flaky).await.0, StatusCode::CREATED);
    futures::stream::iter(0..500)
        .map(|i| {
            let request = server
                .api(Method::POST, "/v1/workflows/flaky/runs")
                .json(&json!({"n": i}));
            async move {
                let (status, body) = read(request.send().await.expect("trigger")).await;
                assert!(status.is_success(), "{status}: {body}");
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<()>>()
        .await;
    let count = |status: &'static str| {
        let pool = server.pool().clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM runs WHERE workflow = 'flaky' AND status::text = $1")
                .bind(status)
                .fetch_one(&pool)
                .await
                .expect("count")
        }
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while count("compensated").await < 500 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the outage's runs did not all compensate"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let bulk = |body: Value, admin: bool| {
        let request = if admin {
            server.admin(Method::POST, "/v1/runs/bulk")
        } else {
            server.api(Method::POST, "/v1/runs/bulk")
        };
        async move {
            read(
                request
                    .header("x-sagaflow-operator", "ada")
                    .json(&body)
                    .send()
                    .await
                    .expect("bulk"),
            )
            .await
        }
    };
    let filter = json!({"workflow": "flaky", "status": "compensated"});
    let before = server.row_counts().await;
    let refusals = [
        (
            json!({"action": "retry", "filter": filter, "dry_run": true}),
            false,
            StatusCode::FORBIDDEN,
            None,
        ),
        (
            json!({"action": "retry", "filter": filter, "limit": 5000}),
            true,
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("limit"),
        ),
        (
            json!({"action": "retry", "filter": {"status": "done"}}),
            true,
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("filter.status"),
        ),
        (
            json!({"action": "retry", "filter": {"colour": "red"}}),
            true,
            StatusCode::UNPROCESSABLE_ENTITY,
            None,
        ),
        (
            json!({"action": "explode", "filter": filter}),
            true,
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("action"),
        ),
        (
            json!({"action": "pause", "filter": filter, "limit": 0}),
            true,
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("limit"),
        ),
    ];
    for (body, admin, expected, field) in refusals {
        let (status, answer) = bulk(body.clone(), admin).await;
        assert_eq!(status, expected, "{body}: {answer}");
        if let Some(field) = field {
            assert_eq!(answer["error"]["field"], field, "{answer}");
        }
    }
    // The dry run counts and samples, and writes nothing.
    let (status, dry) = bulk(
        json!({"action": "retry", "filter": filter, "dry_run": true, "limit": 1000}),
        true,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{dry}");
    assert_eq!((dry["matched"].clone(), dry["acted"].clone()), (json!(500), json!(0)));
    assert_eq!(dry["sample"].as_array().map(Vec::len), Some(20));
    assert_eq!(server.row_counts().await, before, "a dry run writes nothing");

    let (status, done) = bulk(json!({"action": "retry", "filter": filter, "limit": 1000}), true).await;
    assert_eq!(status, StatusCode::OK, "{done}");
    assert_eq!(
        (done["matched"].clone(), done["acted"].clone()),
        (json!(500), json!(500))
    );
    let bulk_id = done["bulk_id"].as_str().expect("bulk id").to_string();
    let logged: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM run_events WHERE kind = 'operator_retry' AND detail->>'bulk_id' = $1 AND detail->>'by' = 'ada'",
    )
    .bind(&bulk_id)
    .fetch_one(server.pool())
    .await
    .expect("count");
    assert_eq!(logged, 500, "one log entry per run, with the operator and the bulk id");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while count("completed").await < 500 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the retries did not all complete"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, again) = bulk(json!({"action": "retry", "filter": filter, "dry_run": true}), true).await;
    assert_eq!(again["matched"], 0, "retried runs are not retried twice: {again}");

    // A bulk cancel of runs that wait: each compensates at once.
    let patient = json!({
        "endpoints": {"shop": {"base_url": participant.base_url()}},
        "steps": [{"name": "wait", "wait": {"signal": "go", "timeout": "1h"}}]
    });
    assert_eq!(put(&server, "patient", &patient).await.0, StatusCode::CREATED);
    for i in 0..3 {
        let (status, _) = read(
            server
                .api(Method::POST, "/v1/workflows/patient/runs")
                .json(&json!({"n": i}))
                .send()
                .await
                .expect("trigger"),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED);
    }
    let (status, cancelled) = bulk(json!({"action": "cancel", "filter": {"workflow": "patient"}}), true).await;
    assert_eq!(
        (status, cancelled["acted"].clone()),
        (StatusCode::OK, json!(3)),
        "{cancelled}"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let cancelled: i64 =
            sqlx::query_scalar("SELECT count(*) FROM runs WHERE workflow = 'patient' AND status = 'cancelled'")
                .fetch_one(server.pool())
                .await
                .expect("count");
        if cancelled == 3 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{cancelled} of 3 cancels finished"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_no_violations(&server).await;
    server.stop().await;
}

#[tokio::test]
async fn waiting_runs_paused_in_bulk_keep_their_signals_and_a_paused_workflow_holds_its_new_runs() {
    let server = start().await;
    let patient = json!({
        "endpoints": {"shop": {"base_url": "http://127.0.0.1:9"}},
        "steps": [{"name": "wait", "wait": {"signal": "go", "timeout": "1h"}}]
    });
    let (status, body) = put(&server, "patient", &patient).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let mut runs = Vec::new();
    for i in 0..3 {
        let (status, created) = post(&server, "/v1/workflows/patient/runs", None, json!({"n": i})).await;
        assert_eq!(status, StatusCode::CREATED, "{created}");
        runs.push(created["id"].as_str().expect("id").to_string());
    }
    for id in &runs {
        waiting_for(&server, id, "signal").await;
    }
    let admin = |method: Method, path: String, body: Option<Value>| {
        let mut request = server.admin(method, &path).header("x-sagaflow-operator", "grace");
        if let Some(body) = body {
            request = request.json(&body);
        }
        async move { read(request.send().await.expect("request")).await }
    };
    let filter = json!({"workflow": "patient"});
    let before = server.row_counts().await;
    let (status, dry) = admin(
        Method::POST,
        "/v1/runs/bulk".into(),
        Some(json!({"action": "pause", "filter": filter, "dry_run": true})),
    )
    .await;
    assert_eq!((status, dry["matched"].clone()), (StatusCode::OK, json!(3)), "{dry}");
    assert_eq!(server.row_counts().await, before, "a dry run writes nothing");
    let (status, paused) = admin(
        Method::POST,
        "/v1/runs/bulk".into(),
        Some(json!({"action": "pause", "filter": filter})),
    )
    .await;
    assert_eq!(
        (status, paused["acted"].clone()),
        (StatusCode::OK, json!(3)),
        "{paused}"
    );
    let bulk_id = paused["bulk_id"].as_str().expect("bulk id").to_string();
    for id in &runs {
        let (_, body) = read(
            server
                .api(Method::GET, &format!("/v1/runs/{id}"))
                .send()
                .await
                .expect("get"),
        )
        .await;
        assert_eq!(
            (
                body["status"].clone(),
                body["paused_from"].clone(),
                body["waiting"]["name"].clone()
            ),
            (json!("paused"), json!("running"), json!("go")),
            "a paused waiting run keeps its wait: {body}"
        );
    }
    let logged: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM run_events WHERE kind = 'run_paused' AND detail->>'bulk_id' = $1 AND detail->>'by' = 'grace'",
    )
    .bind(&bulk_id)
    .fetch_one(server.pool())
    .await
    .expect("count");
    assert_eq!(logged, 3, "one log entry per run, with the operator and the bulk id");

    // A signal sent while paused is kept; the run does not move until it is resumed.
    let (status, _) = post(
        &server,
        &format!("/v1/runs/{}/signals/go", runs[0]),
        None,
        json!({"ok": true}),
    )
    .await;
    assert!(status.is_success(), "{status}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, body) = read(
        server
            .api(Method::GET, &format!("/v1/runs/{}", runs[0]))
            .send()
            .await
            .expect("get"),
    )
    .await;
    assert_eq!(body["status"], "paused", "{body}");

    // Refusals: the API token, a bad body, a bad note, the wrong status, no such run.
    let before = server.row_counts().await;
    let resume_first = format!("/v1/runs/{}/resume", runs[0]);
    let (status, _) = read(server.api(Method::POST, &resume_first).send().await.expect("post")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = read(
        server
            .admin(Method::POST, &resume_first)
            .header("content-type", "application/json")
            .body("{not json")
            .send()
            .await
            .expect("post"),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, answer) = admin(
        Method::POST,
        resume_first.clone(),
        Some(json!({"note": "x".repeat(3000)})),
    )
    .await;
    assert_eq!(
        (status, answer["error"]["field"].clone()),
        (StatusCode::UNPROCESSABLE_ENTITY, json!("note"))
    );
    let (status, answer) = admin(Method::POST, format!("/v1/runs/{}/pause", runs[0]), None).await;
    assert_eq!(
        (status, answer["error"]["code"].clone()),
        (StatusCode::CONFLICT, json!("not_allowed"))
    );
    let (status, _) = admin(Method::POST, format!("/v1/runs/{}/pause", uuid::Uuid::now_v7()), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(server.row_counts().await, before, "a refusal writes nothing");

    // One resumed by hand, with a note; the others in bulk.
    let (status, body) = admin(Method::POST, resume_first, Some(json!({"note": "partner is back"}))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, resumed) = admin(
        Method::POST,
        "/v1/runs/bulk".into(),
        Some(json!({"action": "resume", "filter": filter})),
    )
    .await;
    assert_eq!(
        (status, resumed["acted"].clone()),
        (StatusCode::OK, json!(2)),
        "{resumed}"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (_, body) = read(
            server
                .api(Method::GET, &format!("/v1/runs/{}", runs[0]))
                .send()
                .await
                .expect("get"),
        )
        .await;
        if body["status"] == "completed" {
            assert!(!body["output"].is_null(), "{body}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the signalled run did not complete: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for id in &runs[1..] {
        let body = waiting_for(&server, id, "signal").await;
        assert_eq!(body["status"], "running", "resumed to its wait: {body}");
    }
    let noted: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM run_events WHERE run_id = $1::uuid AND kind = 'run_resumed' AND detail->>'note' = 'partner is back'",
    )
    .bind(&runs[0])
    .fetch_one(server.pool())
    .await
    .expect("count");
    assert_eq!(noted, 1);

    // The workflow paused: a new run is accepted and held; the list says so.
    let (status, body) = admin(
        Method::POST,
        "/v1/workflows/patient/pause".into(),
        Some(json!({"note": "partner maintenance"})),
    )
    .await;
    assert_eq!(
        (status, body["paused"].clone(), body["runs"].clone()),
        (StatusCode::OK, json!(true), json!(0)),
        "{body}"
    );
    let (status, answer) = admin(Method::POST, "/v1/workflows/patient/pause".into(), None).await;
    assert_eq!(
        (status, answer["error"]["code"].clone()),
        (StatusCode::CONFLICT, json!("already_paused"))
    );
    let (status, _) = admin(Method::POST, "/v1/workflows/no-such/pause".into(), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = read(
        server
            .api(Method::POST, "/v1/workflows/patient/pause")
            .send()
            .await
            .expect("post"),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, held) = post(&server, "/v1/workflows/patient/runs", None, json!({"n": 9})).await;
    assert_eq!(status, StatusCode::CREATED, "{held}");
    assert_eq!(
        (held["status"].clone(), held["held"].clone()),
        (json!("pending"), json!("workflow_paused")),
        "{held}"
    );
    let (_, workflows) = read(server.api(Method::GET, "/v1/workflows").send().await.expect("list")).await;
    let listed = workflows["workflows"]
        .as_array()
        .and_then(|all| all.iter().find(|w| w["name"] == "patient"))
        .cloned()
        .expect("listed");
    assert_eq!(
        (
            listed["paused"]["paused_by"].clone(),
            listed["paused"]["held_runs"].clone(),
            listed["paused"]["note"].clone()
        ),
        (json!("grace"), json!(1), json!("partner maintenance")),
        "{listed}"
    );
    let (status, body) = admin(Method::POST, "/v1/workflows/patient/resume".into(), None).await;
    assert_eq!((status, body["runs"].clone()), (StatusCode::OK, json!(1)), "{body}");
    let (status, answer) = admin(Method::POST, "/v1/workflows/patient/resume".into(), None).await;
    assert_eq!(
        (status, answer["error"]["code"].clone()),
        (StatusCode::CONFLICT, json!("not_paused"))
    );
    waiting_for(&server, held["id"].as_str().expect("id"), "signal").await;
    let actions: Vec<String> = sqlx::query_scalar(
        "SELECT action FROM operator_actions WHERE operator = 'grace' AND action <> 'run.pause' ORDER BY id",
    )
    .fetch_all(server.pool())
    .await
    .expect("audit");
    assert_eq!(
        actions,
        [
            "runs.bulk",
            "run.resume",
            "run.resume",
            "run.resume",
            "runs.bulk",
            "workflow.pause",
            "workflow.resume"
        ]
    );
    assert_no_violations(&server).await;
    server.stop().await;
}
