//! The holes an attacker with the API token, a slow client or a stalled step could open
//! (security probe 2), each reproduced as the probe did it, against a real server on real
//! sockets and a real PostgreSQL, asserting the fixed behaviour and that nothing was written.

mod common;

use std::time::Duration;

use common::eventually;
use common::server::{self, TestServer, read};
use reqwest::{Method, StatusCode};
use sagaflow::http::serve::HttpLimits;
use sagaflow::http::throttle::ThrottleConfig;
use sagaflow::pg::PoolConfig;
use serde_json::{Value, json};

/// Every table a refused request must leave alone, as a fingerprint: row counts plus digests
/// of the rows that an update (not only an insert or delete) would change.
async fn fingerprint(server: &TestServer) -> Vec<(String, String)> {
    let mut all: Vec<(String, String)> = server
        .row_counts()
        .await
        .into_iter()
        .map(|(table, n)| (table, n.to_string()))
        .collect();
    for (name, sql) in [
        (
            "runs",
            "SELECT coalesce(md5(string_agg(id::text || status::text || cancel_requested::text || \
             coalesce(idempotency_key, ''), ',' ORDER BY id)), '') FROM runs",
        ),
        (
            "schedules",
            "SELECT coalesce(md5(string_agg(name || expression || enabled::text || input::text || \
             coalesce(last_error, ''), ',' ORDER BY name)), '') FROM schedules",
        ),
        ("schedule_fires", "SELECT count(*)::text FROM schedule_fires"),
        (
            "auth_identities",
            "SELECT coalesce(md5(string_agg(id || app_metadata::text, ',' ORDER BY id)), '') FROM auth_identities",
        ),
    ] {
        let digest: String = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .fetch_one(server.pool())
            .await
            .expect("fingerprint");
        all.push((name.to_string(), digest));
    }
    all
}

/// `n` completed registrations, backdated `days` into the past.
async fn old_runs(server: &TestServer, n: usize, days: i32) {
    for i in 0..n {
        let email = format!("old-{days}-{i}@example.com");
        let identity = server.identity(&email).await;
        let run = server.register(&identity, &email).await;
        assert_eq!(run["status"], "completed", "{run}");
    }
    sqlx::query(
        "UPDATE runs SET created_at = now() - make_interval(days => $1),
                         finished_at = now() - make_interval(days => $1)",
    )
    .bind(days)
    .execute(server.pool())
    .await
    .expect("backdate");
}

/// Sends a request; its status and JSON body.
async fn call(request: reqwest::RequestBuilder) -> (StatusCode, Value) {
    read(request.send().await.expect("request")).await
}

fn assert_error(status: StatusCode, body: &Value, want: StatusCode, code: &str) {
    assert_eq!(status, want, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");
}

#[tokio::test]
async fn the_api_token_cannot_erase_the_run_history() {
    let server = server::start().await;
    old_runs(&server, 3, 2).await;
    let before = fingerprint(&server).await;

    // F1 as the probe did it: the API token starts the sweep with a minute's retention.
    let (status, body) = call(
        server
            .api(Method::POST, "/v1/workflows/retention-sweep/runs?wait_ms=5000")
            .json(&json!({"older_than": "1m"})),
    )
    .await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden");
    // Even without input: the workflow itself is admin-only.
    let (status, body) = call(
        server
            .api(Method::POST, "/v1/workflows/retention-sweep/runs")
            .json(&json!({})),
    )
    .await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden");

    // The admin token is held to the floor (a day by default) and to a sane maximum (the
    // probe's F7 input that panicked on every attempt).
    for (older_than, says) in [
        ("1m", "at least 1day"),
        ("23h 59m", "at least 1day"),
        ("99999999999d", "at most 100 years"),
    ] {
        let (status, body) = call(
            server
                .admin(Method::POST, "/v1/workflows/retention-sweep/runs?wait_ms=5000")
                .json(&json!({"older_than": older_than})),
        )
        .await;
        assert_error(status, &body, StatusCode::UNPROCESSABLE_ENTITY, "invalid_input");
        assert_eq!(body["error"]["field"], "older_than", "{body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{older_than}: {message}");
        // The same inputs are refused for a schedule, before it could fire them.
        let (status, body) = read(
            server
                .admin(Method::POST, "/v1/schedules")
                .json(&json!({"name": "sweeper", "expression": "0 3 * * *",
                              "workflow": "retention-sweep", "input": {"older_than": older_than}}))
                .send()
                .await
                .expect("request"),
        )
        .await;
        assert_error(status, &body, StatusCode::UNPROCESSABLE_ENTITY, "invalid_input");
        assert_eq!(body["error"]["field"], "input.older_than", "{body}");
    }
    assert_eq!(fingerprint(&server).await, before, "refused requests wrote nothing");

    // The plan says who may trigger what.
    let (_, workflows) = read(server.api(Method::GET, "/v1/workflows").send().await.expect("request")).await;
    let access = |name: &str| {
        workflows["workflows"]
            .as_array()
            .and_then(|all| all.iter().find(|w| w["name"] == name))
            .map(|w| w["access"].clone())
    };
    assert_eq!(access("retention-sweep"), Some(json!("admin")));
    assert_eq!(access("create-customer-account"), Some(json!("api")));

    // At the floor, the admin's sweep runs and deletes the two-day-old runs.
    let (status, body) = call(
        server
            .admin(Method::POST, "/v1/workflows/retention-sweep/runs?wait_ms=20000")
            .json(&json!({"older_than": "1d"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "completed", "{body}");
    assert_eq!(body["output"]["deleted"], 3, "{body}");
    server.stop().await;
}

#[tokio::test]
async fn a_schedules_ticks_cannot_be_claimed_or_adopted() {
    let server = server::start().await;
    let (status, schedule) = read(
        server
            .admin(Method::POST, "/v1/schedules")
            .json(&json!({"name": "hijack-me", "expression": "*/2 * * * * *",
                          "workflow": "retention-sweep", "input": {"older_than": "3650d"},
                          "overlap": "allow", "catch_up": "none"}))
            .send()
            .await
            .expect("create"),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{schedule}");
    let before = fingerprint(&server).await;

    // F2 as the probe did it: the API token pre-creates runs under the next ticks' keys, of
    // the sweep and of an ordinary workflow alike. Both are refused, whatever the workflow.
    let upcoming: Vec<String> = schedule["upcoming"]
        .as_array()
        .expect("upcoming")
        .iter()
        .filter_map(|t| t.as_str().map(str::to_string))
        .collect();
    for tick in &upcoming[..2] {
        for (workflow, body) in [
            ("retention-sweep", json!({"older_than": "3650d"})),
            (
                "create-customer-account",
                server::registration("authid_x", "squatter@example.com"),
            ),
        ] {
            for key in [format!("schedule:hijack-me:{tick}"), "schedule:anything".to_string()] {
                let (status, body) = call(
                    server
                        .admin(Method::POST, &format!("/v1/workflows/{workflow}/runs"))
                        .header("idempotency-key", &key)
                        .json(&body),
                )
                .await;
                assert_error(status, &body, StatusCode::UNPROCESSABLE_ENTITY, "invalid_input");
                assert_eq!(body["error"]["field"], "Idempotency-Key", "{body}");
                assert!(
                    body["error"]["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("reserved for schedules")),
                    "{body}"
                );
            }
        }
    }
    assert_eq!(fingerprint(&server).await, before, "refused triggers wrote nothing");

    // A foreign run that holds a tick's key anyway (left by a version before this fix): the
    // tick records an error on the schedule and never adopts the run as its own.
    server
        .admin(Method::PUT, "/v1/schedules/hijack-me")
        .json(
            &json!({"name": "hijack-me", "expression": "*/2 * * * * *", "enabled": false,
                      "workflow": "retention-sweep", "input": {"older_than": "3650d"},
                      "overlap": "allow", "catch_up": "none"}),
        )
        .send()
        .await
        .expect("disable");
    let (_, foreign) = call(
        server
            .admin(Method::POST, "/v1/workflows/retention-sweep/runs?wait_ms=20000")
            .header("idempotency-key", "squatter")
            .json(&json!({"older_than": "3650d"})),
    )
    .await;
    let foreign_id = foreign["id"].as_str().expect("id").to_string();
    let (_, enabled) = call(server.admin(Method::POST, "/v1/schedules/hijack-me/enable")).await;
    // Two ticks ahead, so the scheduler cannot reach it before the key is planted.
    let next_tick = enabled["upcoming"][2].as_str().expect("a tick ahead").to_string();
    sqlx::query("UPDATE runs SET idempotency_key = $1 WHERE id = $2::uuid")
        .bind(format!("schedule:hijack-me:{next_tick}"))
        .bind(&foreign_id)
        .execute(server.pool())
        .await
        .expect("plant the foreign key");
    let schedule = eventually(Duration::from_secs(20), "the tick to meet the foreign run", || async {
        let (_, body) = call(server.api(Method::GET, "/v1/schedules/hijack-me")).await;
        body["last_error"]
            .as_str()
            .is_some_and(|e| e.contains(&foreign_id))
            .then_some(body)
    })
    .await;
    let error = schedule["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("started by api, not by schedule"), "{error}");
    let adopted = schedule["recent_runs"]
        .as_array()
        .expect("recent runs")
        .iter()
        .any(|r| r["run_id"] == foreign_id.as_str());
    assert!(!adopted, "the foreign run is not the tick's: {schedule}");
    let fires: i64 = sqlx::query_scalar("SELECT count(*) FROM schedule_fires WHERE run_id = $1::uuid")
        .bind(&foreign_id)
        .fetch_one(server.pool())
        .await
        .expect("fires");
    assert_eq!(fires, 0);
    // The schedule goes on firing its own runs at the next ticks.
    eventually(Duration::from_secs(20), "a tick of the schedule's own", || async {
        let (_, body) = call(server.api(Method::GET, "/v1/schedules/hijack-me")).await;
        body["recent_runs"]
            .as_array()
            .is_some_and(|r| !r.is_empty())
            .then_some(())
    })
    .await;
    // Its ticks are counted by workflow, not by schedule name: a metric series per schedule
    // ever created would grow without bound.
    let metrics = server.metrics().await;
    let ticks: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("sagaflow_schedule_ticks_total{"))
        .collect();
    assert!(
        ticks.iter().any(|l| l.contains("workflow=\"retention-sweep\"")),
        "{ticks:?}"
    );
    assert!(!ticks.iter().any(|l| l.contains("schedule=")), "{ticks:?}");
    server.stop().await;
}

#[tokio::test]
async fn path_parameters_that_name_nothing_get_the_json_error_shape() {
    let server = server::start().await;
    let before = fingerprint(&server).await;
    // F5 and F8: a NUL, and bytes that are not UTF-8, in every route's path parameter.
    for bad in ["a%00b", "%FF", "%C3%28"] {
        let routes = [
            (Method::GET, format!("/v1/runs/{bad}")),
            (Method::GET, format!("/v1/runs/{bad}/events")),
            (Method::POST, format!("/v1/runs/{bad}/retry")),
            (Method::POST, format!("/v1/runs/{bad}/cancel")),
            (Method::GET, format!("/v1/auth-identities/{bad}")),
            (Method::GET, format!("/v1/customers/{bad}")),
            (Method::GET, format!("/v1/schedules/{bad}")),
            (Method::PUT, format!("/v1/schedules/{bad}")),
            (Method::DELETE, format!("/v1/schedules/{bad}")),
            (Method::POST, format!("/v1/schedules/{bad}/enable")),
            (Method::POST, format!("/v1/schedules/{bad}/disable")),
            (Method::POST, format!("/v1/schedules/{bad}/fire")),
            (Method::POST, format!("/v1/workflows/{bad}/runs")),
            (Method::GET, format!("/v1/workflow-definitions/{bad}")),
            (Method::PUT, format!("/v1/workflow-definitions/{bad}")),
            (Method::GET, format!("/v1/workflow-definitions/{bad}/versions")),
            (Method::DELETE, format!("/v1/workflow-definitions/{bad}/versions/1")),
            (Method::DELETE, format!("/v1/workflow-definitions/order/versions/{bad}")),
        ];
        for (method, path) in routes {
            let request = server.admin(method.clone(), &path);
            let request = if method == Method::GET || method == Method::DELETE {
                request
            } else {
                request.json(&json!({}))
            };
            let response = request.send().await.expect("request");
            let content_type = response
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            let (status, body) = read(response).await;
            assert_eq!(content_type, "application/json", "{method} {path}: {body}");
            assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
        }
    }
    assert_eq!(fingerprint(&server).await, before, "nothing was written");
    server.stop().await;
}

#[tokio::test]
async fn a_stalled_step_never_takes_the_apis_connections() {
    let server = server::start_with(|config| {
        config.engine.max_concurrent_runs = 64;
        config.engine.claim_batch = 32;
        config.pool = PoolConfig {
            max_connections: 16,
            api_connections: 4,
            lock_timeout: Some(Duration::from_millis(500)),
            statement_timeout: Some(Duration::from_secs(5)),
            acquire_timeout: Duration::from_secs(2),
            ..PoolConfig::default()
        };
    })
    .await;
    let mut identities = Vec::new();
    for i in 0..100 {
        identities.push(server.identity(&format!("stall-{i}@example.com")).await);
    }
    // F4 as the probe did it: a lock on a table a step needs (set-auth-app-metadata updates
    // the identity), held well past the pool's acquire timeout.
    let mut holder = server.pool().begin().await.expect("tx");
    sqlx::query("LOCK TABLE auth_identities IN EXCLUSIVE MODE")
        .execute(&mut *holder)
        .await
        .expect("lock");
    let triggers: Vec<_> = identities
        .iter()
        .enumerate()
        .map(|(i, identity)| {
            let request = server
                .api(Method::POST, "/v1/workflows/create-customer-account/runs?wait_ms=30000")
                .header("idempotency-key", format!("stall-{i}"))
                .json(&server::registration(identity, &format!("stall-{i}@example.com")));
            tokio::spawn(async move {
                let response = request.send().await.expect("trigger");
                (i, read(response).await)
            })
        })
        .collect();
    // While every step is stalled: health and reads answer at once.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stalled_until = tokio::time::Instant::now() + Duration::from_secs(4);
    let mut checks = 0;
    while tokio::time::Instant::now() < stalled_until {
        let started = tokio::time::Instant::now();
        let response = server.client.get(server.url("/healthz")).send().await.expect("healthz");
        assert_eq!(response.status(), StatusCode::OK, "healthz during the stall");
        let (status, _) = read(server.api(Method::GET, "/v1/runs?limit=5").send().await.expect("list")).await;
        assert_eq!(status, StatusCode::OK, "a read during the stall");
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "answered in {:?}",
            started.elapsed()
        );
        checks += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(checks >= 5, "checked {checks} times");
    holder.rollback().await.expect("unlock");

    // No trigger whose run committed answered an error: a 5xx (the API's own connections
    // exhausted before the insert) is allowed only where no run holds its key.
    let mut answered = 0;
    for trigger in triggers {
        let (i, (status, body)) = trigger.await.expect("task");
        let key = format!("stall-{i}");
        let stored: Option<String> = sqlx::query_scalar("SELECT id::text FROM runs WHERE idempotency_key = $1")
            .bind(&key)
            .fetch_optional(server.pool())
            .await
            .expect("run by key");
        if status.is_server_error() {
            assert_eq!(stored, None, "{key} answered {status} but its run exists: {body}");
        } else {
            assert!(
                status == StatusCode::OK || status == StatusCode::CREATED,
                "{key}: {status} {body}"
            );
            assert_eq!(body["id"].as_str(), stored.as_deref(), "{key}");
            answered += 1;
        }
    }
    assert!(answered >= 90, "only {answered} of 100 triggers were accepted");
    // And every accepted run finishes once the lock is gone.
    eventually(Duration::from_secs(60), "every run to finish", || async {
        let unfinished: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM runs WHERE status NOT IN ('completed', 'compensated', 'failed', 'cancelled')",
        )
        .fetch_one(server.pool())
        .await
        .expect("count");
        (unfinished == 0).then_some(())
    })
    .await;
    server.stop().await;
}

/// Waits until the server closes `stream` (end of file or an error); returns what it sent
/// before, or None if it was still open after `within`.
async fn closed_within(stream: &mut tokio::net::TcpStream, within: Duration) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buffer)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(String::from_utf8_lossy(&received).into_owned()),
            Ok(Ok(n)) => received.extend_from_slice(&buffer[..n]),
        }
    }
}

fn slow_limits(max_connections: usize) -> HttpLimits {
    HttpLimits {
        header_timeout: Duration::from_secs(1),
        body_timeout: Duration::from_secs(1),
        request_timeout: Duration::from_secs(60),
        max_connections,
    }
}

#[tokio::test]
async fn slow_clients_are_timed_out_while_health_keeps_answering() {
    use tokio::io::AsyncWriteExt;
    let server = server::start_with(|config| config.http = slow_limits(256)).await;
    let before = fingerprint(&server).await;
    let opened = tokio::time::Instant::now();

    // F6 as the probe did it: sockets that trickle header lines, ...
    let mut trickling = Vec::new();
    for _ in 0..50 {
        let stream = tokio::net::TcpStream::connect(server.addr).await.expect("connect");
        let (mut reader, mut writer) = stream.into_split();
        tokio::spawn(async move {
            if writer.write_all(b"GET /v1/runs HTTP/1.1\r\nHost: x\r\n").await.is_err() {
                return;
            }
            for _ in 0..100 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if writer.write_all(b"X-a: b\r\n").await.is_err() {
                    return;
                }
            }
        });
        trickling.push(tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut buffer = [0u8; 1024];
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            loop {
                match tokio::time::timeout_at(deadline, reader.read(&mut buffer)).await {
                    Err(_) => return false,
                    Ok(Ok(0)) | Ok(Err(_)) => return true,
                    Ok(Ok(_)) => {}
                }
            }
        }));
    }
    // ... one that promises 50 bytes of body and sends 11, ...
    let mut short_body = tokio::net::TcpStream::connect(server.addr).await.expect("connect");
    short_body
        .write_all(
            format!(
                "POST /v1/auth-identities HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
                 Content-Type: application/json\r\nContent-Length: 50\r\n\r\n{{\"provider\"",
                server::API_TOKEN
            )
            .as_bytes(),
        )
        .await
        .expect("write");
    // ... one that sends nothing, and a keep-alive connection left idle after an answer.
    let mut silent = tokio::net::TcpStream::connect(server.addr).await.expect("connect");
    let mut idle = tokio::net::TcpStream::connect(server.addr).await.expect("connect");
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");

    // Meanwhile the server answers as usual.
    for _ in 0..5 {
        let started = tokio::time::Instant::now();
        let response = server.client.get(server.url("/healthz")).send().await.expect("healthz");
        assert_eq!(response.status(), StatusCode::OK);
        assert!(started.elapsed() < Duration::from_millis(500));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let answer = closed_within(&mut short_body, Duration::from_secs(5))
        .await
        .expect("the short body's connection is closed");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"code\":\"request_timeout\""), "{answer}");
    assert!(
        closed_within(&mut silent, Duration::from_secs(5)).await.is_some(),
        "a silent connection is closed"
    );
    let answer = closed_within(&mut idle, Duration::from_secs(5))
        .await
        .expect("an idle keep-alive connection is closed");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    for socket in trickling {
        assert!(socket.await.expect("task"), "a trickling connection is closed");
    }
    // Closed at the deadline, not before: a second at least (and well under the trickle's 10).
    let took = opened.elapsed();
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert_eq!(fingerprint(&server).await, before, "nothing was written");
    server.stop().await;
}

#[tokio::test]
async fn connections_past_the_cap_wait_until_one_closes() {
    let server = server::start_with(|config| config.http = slow_limits(4)).await;
    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(tokio::net::TcpStream::connect(server.addr).await.expect("connect"));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Every slot is taken: a fifth client is not served...
    let refused = server
        .client
        .get(server.url("/healthz"))
        .timeout(Duration::from_millis(300))
        .send()
        .await;
    assert!(refused.is_err(), "served past the cap: {refused:?}");
    // ... until the silent ones are closed at the header deadline.
    let response = server
        .client
        .get(server.url("/healthz"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .expect("served once a slot is free");
    assert_eq!(response.status(), StatusCode::OK);
    for mut stream in silent {
        assert!(closed_within(&mut stream, Duration::from_secs(3)).await.is_some());
    }
    server.stop().await;
}

#[tokio::test]
async fn oversized_headers_get_the_error_shape() {
    let server = server::start().await;
    let before = fingerprint(&server).await;
    let mut many = server.api(Method::GET, "/v1/runs");
    for i in 0..150 {
        many = many.header(format!("x-junk-{i}"), "a");
    }
    let big = server
        .api(Method::GET, "/v1/runs")
        .header("x-junk", "a".repeat(100_000));
    for request in [many, big] {
        let (status, body) = read(request.send().await.expect("request")).await;
        assert_error(
            status,
            &body,
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
        );
    }
    assert_eq!(fingerprint(&server).await, before);
    server.stop().await;
}

/// The login form's nonce cookie and CSRF token, as an unauthenticated visitor gets them.
async fn login_form(client: &reqwest::Client, base: &str) -> (String, String) {
    let response = client.get(format!("{base}/login")).send().await.expect("login form");
    assert_eq!(response.status(), StatusCode::OK);
    let nonce = response
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|c| c.strip_prefix("sagaflow_login="))
        .and_then(|c| c.split(';').next())
        .expect("nonce cookie")
        .to_string();
    let body = response.text().await.expect("body");
    let csrf = body
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("csrf field")
        .to_string();
    (nonce, csrf)
}

/// Logs in with `token`; the session cookie (`name=value`) when it worked, and the status.
async fn log_in(client: &reqwest::Client, base: &str, token: &str) -> (StatusCode, Option<String>) {
    let (nonce, csrf) = login_form(client, base).await;
    let response = client
        .post(format!("{base}/login"))
        .header("cookie", format!("sagaflow_login={nonce}"))
        .form(&[("token", token), ("csrf", csrf.as_str())])
        .send()
        .await
        .expect("login");
    let cookie = response
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|c| c.starts_with("sagaflow_session=") && !c.contains("Max-Age=0"))
        .and_then(|c| c.split(';').next())
        .map(str::to_string);
    (response.status(), cookie)
}

fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    use hmac::Mac;
    let mut mac = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(key).expect("any length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().to_vec()
}

#[tokio::test]
async fn the_login_form_gives_no_offline_oracle_for_the_admin_token() {
    use base64::Engine as _;
    use sha2::Digest;
    let server = server::start().await;
    let (nonce, csrf) = login_form(&no_redirects(), &server.url("")).await;
    let b64 = |bytes: Vec<u8>| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    // F3 as the probe did it: knowing the admin token (here: the right guess), recompute the
    // form's token from the token alone. At 2b67f91 this matched, so guesses could be tested
    // offline at hash speed.
    let from_token_only = {
        let key = hmac(
            &sha2::Sha256::digest(server::ADMIN_TOKEN.as_bytes()),
            &[b"sagaflow dashboard session v1"],
        );
        b64(hmac(&key, &[b"login\0", nonce.as_bytes()]))
    };
    assert_ne!(
        csrf, from_token_only,
        "the form's token is derived from the admin token alone"
    );
    // It takes the stored random secret, which no visitor sees.
    let secret: Vec<u8> = sqlx::query_scalar("SELECT secret FROM dashboard_secret")
        .fetch_one(server.pool())
        .await
        .expect("secret");
    let key = hmac(
        &secret,
        &[
            &sha2::Sha256::digest(server::ADMIN_TOKEN.as_bytes()),
            b"sagaflow dashboard session v2",
        ],
    );
    assert_eq!(csrf, b64(hmac(&key, &[b"login\0", nonce.as_bytes()])));
    server.stop().await;
}

#[tokio::test]
async fn weak_configured_tokens_are_refused_at_start() {
    let db = common::test_db().await;
    for (api, admin, says) in [
        (server::API_TOKEN, "dev-admin", "SAGAFLOW_ADMIN_TOKEN is 9 characters"),
        ("dev-api", server::ADMIN_TOKEN, "SAGAFLOW_API_TOKEN is 7 characters"),
        (server::ADMIN_TOKEN, server::ADMIN_TOKEN, "must differ"),
    ] {
        let mut config = server::config_for(&db.url);
        config.api_token = api.into();
        config.admin_token = admin.into();
        let refused = sagaflow::server::start(config).await;
        let message = match refused {
            Ok(_) => panic!("{api} / {admin} accepted"),
            Err(e) => e.to_string(),
        };
        assert!(message.contains(says), "{message}");
    }
}

#[tokio::test]
async fn logging_out_ends_sessions_on_every_instance() {
    let a = server::start().await;
    // A second instance on the same database.
    let mut config = server::config_for(&a.db.url);
    config.engine.node_id = "second".into();
    config.run_worker = false;
    let b = sagaflow::server::start(config).await.expect("second instance");
    let b_url = format!("http://{}", b.addr);
    let client = no_redirects();
    let page = |base: String, cookie: String| {
        let client = client.clone();
        async move {
            let response = client
                .get(format!("{base}/"))
                .header("cookie", cookie)
                .send()
                .await
                .expect("get");
            let status = response.status();
            let csrf = response
                .text()
                .await
                .expect("body")
                .split("name=\"csrf\" value=\"")
                .nth(1)
                .and_then(|rest| rest.split('"').next())
                .map(str::to_string);
            (status, csrf)
        }
    };
    let (_, first) = log_in(&client, &a.url(""), server::ADMIN_TOKEN).await;
    let (_, second) = log_in(&client, &b_url, server::ADMIN_TOKEN).await;
    let (first, second) = (first.expect("session"), second.expect("session"));
    // Either instance accepts either session (one secret, in the database).
    for (base, cookie) in [(a.url(""), &first), (b_url.clone(), &first), (a.url(""), &second)] {
        assert_eq!(page(base, cookie.clone()).await.0, StatusCode::OK);
    }
    // Logging out on A ends that session on B as well; the other one stays.
    let (_, csrf) = page(a.url(""), first.clone()).await;
    let response = client
        .post(a.url("/logout"))
        .header("cookie", &first)
        .form(&[("csrf", csrf.expect("csrf").as_str())])
        .send()
        .await
        .expect("logout");
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert_eq!(page(b_url.clone(), first.clone()).await.0, StatusCode::SEE_OTHER);
    assert_eq!(page(a.url(""), first.clone()).await.0, StatusCode::SEE_OTHER);
    assert_eq!(page(b_url.clone(), second.clone()).await.0, StatusCode::OK);

    // "Log out everywhere" on B ends every session, A's included; it needs the form token.
    let (_, third) = log_in(&client, &a.url(""), server::ADMIN_TOKEN).await;
    let third = third.expect("session");
    let refused = client
        .post(format!("{b_url}/logout-everywhere"))
        .header("cookie", &second)
        .form(&[("csrf", "forged")])
        .send()
        .await
        .expect("forged");
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    assert_eq!(page(a.url(""), third.clone()).await.0, StatusCode::OK);
    let (_, csrf) = page(b_url.clone(), second.clone()).await;
    let response = client
        .post(format!("{b_url}/logout-everywhere"))
        .header("cookie", &second)
        .form(&[("csrf", csrf.expect("csrf").as_str())])
        .send()
        .await
        .expect("logout everywhere");
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    for (base, cookie) in [(a.url(""), &second), (b_url.clone(), &second), (a.url(""), &third)] {
        assert_eq!(page(base, cookie.clone()).await.0, StatusCode::SEE_OTHER);
    }
    let open: i64 = sqlx::query_scalar("SELECT count(*) FROM dashboard_sessions")
        .fetch_one(a.pool())
        .await
        .expect("count");
    assert_eq!(open, 0);
    b.shutdown().await;
    a.stop().await;
}

/// A client whose connections come from `address` (any of 127.0.0.0/8 reaches the server).
fn client_from(address: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(address.parse::<std::net::IpAddr>().ok())
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

async fn metric(server: &TestServer, name: &str, kind: &str) -> f64 {
    server
        .metrics()
        .await
        .lines()
        .filter(|l| l.starts_with(name) && l.contains(&format!("kind=\"{kind}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn failed_authentications_are_throttled_per_address() {
    let server = server::start_with(|config| {
        config.auth_throttle = ThrottleConfig {
            max_failures: 5,
            window: Duration::from_secs(60),
        };
    })
    .await;
    let attacker = client_from("127.0.0.2");
    let bystander = client_from("127.0.0.3");
    let runs = server.url("/v1/runs");

    // Bearer guesses: five wrong tokens are 401s, then the address is refused, the right
    // token included, with Retry-After.
    for i in 0..5 {
        let response = attacker
            .get(&runs)
            .bearer_auth(format!("guess-{i}"))
            .send()
            .await
            .expect("guess");
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    }
    for token in ["guess-6", server::API_TOKEN] {
        let response = attacker.get(&runs).bearer_auth(token).send().await.expect("blocked");
        let retry_after: u64 = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .expect("Retry-After");
        assert!((1..=60).contains(&retry_after), "{retry_after}");
        let (status, body) = read(response).await;
        assert_error(status, &body, StatusCode::TOO_MANY_REQUESTS, "throttled");
    }
    // Another address is not affected, and a request with no token at all is no guess.
    let response = bystander
        .get(&runs)
        .bearer_auth(server::API_TOKEN)
        .send()
        .await
        .expect("ok");
    assert_eq!(response.status(), StatusCode::OK);
    for _ in 0..10 {
        let response = bystander.get(&runs).send().await.expect("no token");
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    }
    let response = bystander
        .get(&runs)
        .bearer_auth(server::API_TOKEN)
        .send()
        .await
        .expect("ok");
    assert_eq!(response.status(), StatusCode::OK);

    // Dashboard logins from a third address: five wrong tokens, then 429 even for the right one.
    let guesser = client_from("127.0.0.4");
    let base = server.url("");
    for _ in 0..5 {
        let (status, cookie) = log_in(&guesser, &base, "not-the-admin-token").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert!(cookie.is_none());
    }
    let (nonce, csrf) = login_form(&guesser, &base).await;
    let response = guesser
        .post(format!("{base}/login"))
        .header("cookie", format!("sagaflow_login={nonce}"))
        .form(&[("token", server::ADMIN_TOKEN), ("csrf", csrf.as_str())])
        .send()
        .await
        .expect("login");
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(response.headers().contains_key("retry-after"));
    assert!(response.text().await.expect("page").contains("Too many failed logins"));
    // The bystander logs in as usual.
    let (status, cookie) = log_in(&bystander, &base, server::ADMIN_TOKEN).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert!(cookie.is_some());

    // Counted in /metrics.
    assert!(metric(&server, "sagaflow_auth_failures_total", "bearer").await >= 5.0);
    assert!(metric(&server, "sagaflow_auth_failures_total", "login").await >= 5.0);
    assert!(metric(&server, "sagaflow_auth_throttled_total", "bearer").await >= 2.0);
    assert!(metric(&server, "sagaflow_auth_throttled_total", "login").await >= 1.0);
    server.stop().await;
}
