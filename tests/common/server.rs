//! A real sagaflow server in the test process: a listener on port 0, a fresh database, and
//! an HTTP client that speaks to it.

use std::net::SocketAddr;
use std::time::Duration;

use reqwest::{Method, RequestBuilder, Response, StatusCode};
use sagaflow::http::throttle::ThrottleConfig;
use sagaflow::pg::PoolConfig;
use sagaflow::server::{self, RunningServer, ServerConfig};
use serde_json::{Value, json};
use sqlx::PgPool;

use super::{TestDb, fast_config, test_db};

pub const API_TOKEN: &str = "test-api-token-0123456789abcdef0123";
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789abcdef012";

pub struct TestServer {
    pub db: TestDb,
    pub addr: SocketAddr,
    pub client: reqwest::Client,
    running: Option<RunningServer>,
}

/// Starts a server on a fresh database.
pub async fn start() -> TestServer {
    start_with(|_| {}).await
}

/// The configuration of a test server on the database at `database_url`.
pub fn config_for(database_url: &str) -> ServerConfig {
    ServerConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        database_url: Some(database_url.to_string()),
        data_dir: std::env::temp_dir(),
        engine: fast_config("api-test"),
        pool: PoolConfig {
            max_connections: 16,
            ..PoolConfig::default()
        },
        faults: None,
        run_worker: true,
        api_token: API_TOKEN.into(),
        admin_token: ADMIN_TOKEN.into(),
        schedules: Default::default(),
        http: Default::default(),
        // Tests send many wrong tokens on purpose; the throttle's own test lowers this.
        auth_throttle: ThrottleConfig {
            max_failures: 10_000,
            ..ThrottleConfig::default()
        },
        application: Default::default(),
        defined: Default::default(),
        // Retries within a test's patience: 50 ms, then ×3; a minute's window.
        webhooks: server::WebhookSettings {
            retry_window: Duration::from_secs(60),
            first_retry: Duration::from_millis(50),
            attempt_timeout: Duration::from_secs(5),
            poll: Duration::from_millis(20),
            overdue_grace: Duration::from_secs(1),
        },
    }
}

/// Starts a server on a fresh database, after `tweak` adjusted its configuration.
pub async fn start_with(tweak: impl FnOnce(&mut ServerConfig)) -> TestServer {
    let db = test_db().await;
    let mut config = config_for(&db.url);
    tweak(&mut config);
    let running = server::start(config).await.expect("server starts");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client");
    TestServer {
        db,
        addr: running.addr,
        client,
        running: Some(running),
    }
}

impl TestServer {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn pool(&self) -> &PgPool {
        &self.db.pool
    }

    /// The server's engine (its registered workflows, defined ones included).
    pub fn engine(&self) -> sagaflow::engine::Engine {
        self.running.as_ref().expect("running").engine.clone()
    }

    /// A request with the API token.
    pub fn api(&self, method: Method, path: &str) -> RequestBuilder {
        self.client.request(method, self.url(path)).bearer_auth(API_TOKEN)
    }

    /// A request with the admin token.
    pub fn admin(&self, method: Method, path: &str) -> RequestBuilder {
        self.client.request(method, self.url(path)).bearer_auth(ADMIN_TOKEN)
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics(&self) -> String {
        self.api(Method::GET, "/metrics")
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text")
    }

    /// Creates an auth identity for `email`; returns its id.
    pub async fn identity(&self, email: &str) -> String {
        let response = self
            .api(Method::POST, "/v1/auth-identities")
            .json(&json!({"provider": "emailpass", "entity_id": email}))
            .send()
            .await
            .expect("request");
        let (status, body) = read(response).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body["id"].as_str().expect("id").to_string()
    }

    /// Triggers a registration and waits for it to finish; returns the run.
    pub async fn register(&self, identity: &str, email: &str) -> Value {
        let response = self
            .api(Method::POST, "/v1/workflows/create-customer-account/runs?wait_ms=20000")
            .json(&registration(identity, email))
            .send()
            .await
            .expect("request");
        let (status, body) = read(response).await;
        assert!(
            status == StatusCode::OK || status == StatusCode::CREATED,
            "{status}: {body}"
        );
        if body["status"] == "running" || body["status"] == "pending" || body["status"] == "compensating" {
            return self.wait_terminal(body["id"].as_str().expect("id")).await;
        }
        body
    }

    /// Polls a run until it is terminal.
    pub async fn wait_terminal(&self, run: &str) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let (_, body) = read(
                self.api(Method::GET, &format!("/v1/runs/{run}"))
                    .send()
                    .await
                    .expect("get"),
            )
            .await;
            let status = body["status"].as_str().unwrap_or_default();
            if ["completed", "compensated", "failed", "cancelled"].contains(&status) {
                return body;
            }
            assert!(tokio::time::Instant::now() < deadline, "run {run} still {status}");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Rows in each table a rejected request must not touch.
    pub async fn row_counts(&self) -> Vec<(String, i64)> {
        let mut counts = Vec::new();
        for table in [
            "runs",
            "run_steps",
            "run_events",
            "customers",
            "customer_addresses",
            "auth_identities",
            "outbox_events",
        ] {
            let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
                .fetch_one(self.pool())
                .await
                .expect("count");
            counts.push((table.to_string(), n));
        }
        counts
    }

    pub async fn stop(mut self) {
        if let Some(running) = self.running.take() {
            running.shutdown().await;
        }
    }
}

pub fn registration(identity: &str, email: &str) -> Value {
    json!({"authIdentityId": identity, "customerData": {"email": email, "first_name": "Ada", "last_name": "Lovelace"}})
}

/// Asserts a new run's trigger answer is the contract's: 201 while the run is not terminal,
/// 200 once it is. A worker may finish a quick run before the answer reads it back, so a test
/// cannot expect 201 from a run it does not hold.
pub fn assert_triggered(status: StatusCode, run: &Value) {
    let terminal = matches!(
        run["status"].as_str(),
        Some("completed" | "compensated" | "failed" | "cancelled")
    );
    let expected = if terminal { StatusCode::OK } else { StatusCode::CREATED };
    assert_eq!(status, expected, "{run}");
    assert!(run["id"].is_string(), "{run}");
}

/// Status and JSON body of a response.
pub async fn read(response: Response) -> (StatusCode, Value) {
    let status = response.status();
    let text = response.text().await.expect("body");
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, body)
}
