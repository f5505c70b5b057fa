//! Shared test setup: one PostgreSQL cluster per test binary (started the way the server
//! starts its embedded default, or `DATABASE_URL` when given), a migrated template, and a
//! fresh database per test.
#![allow(dead_code, missing_docs)]

pub mod participant;
pub mod process;
pub mod scripted;
pub mod server;

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use sagaflow::engine::EngineConfig;
use sagaflow::pg::embedded::EmbeddedPostgres;
use sagaflow::pg::{self, PoolConfig};
use sqlx::{Connection, PgConnection, PgPool};
use tokio::sync::OnceCell;

const TEMPLATE: &str = "sagaflow_template";

/// Where tests create their databases.
struct Server {
    /// URL of a database to run `CREATE DATABASE` from.
    admin_url: String,
    /// Builds the URL of another database on the same server.
    url_of: Box<dyn Fn(&str) -> String + Send + Sync>,
    /// The cluster, when the tests started their own.
    cluster: Option<EmbeddedPostgres>,
}

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        if let Ok(url) = std::env::var("DATABASE_URL") {
            let base = url.clone();
            return Server {
                admin_url: url,
                url_of: Box::new(move |db| sagaflow::pg::with_database(&base, db)),
                cluster: None,
            };
        }
        let cluster = EmbeddedPostgres::start_ephemeral().expect("start a PostgreSQL cluster for the tests");
        let admin_url = cluster.url("postgres");
        let admin = cluster.url("postgres");
        Server {
            admin_url,
            url_of: Box::new(move |db| sagaflow::pg::with_database(&admin, db)),
            cluster: Some(cluster),
        }
    })
}

/// The cluster the tests started (None when DATABASE_URL was given).
pub fn cluster() -> Option<&'static EmbeddedPostgres> {
    server().cluster.as_ref()
}

async fn template_ready() {
    static READY: OnceCell<()> = OnceCell::const_new();
    READY
        .get_or_init(|| async {
            let server = server();
            pg::recreate_database(&server.admin_url, TEMPLATE)
                .await
                .expect("create template");
            let mut conn = PgConnection::connect(&(server.url_of)(TEMPLATE))
                .await
                .expect("connect to template");
            pg::MIGRATOR.run(&mut conn).await.expect("migrate template");
            sqlx::raw_sql(
                "CREATE TABLE test_effects (
                     run_id uuid NOT NULL, step text NOT NULL, phase text NOT NULL, attempt int NOT NULL, received jsonb,
                     at timestamptz NOT NULL DEFAULT clock_timestamp());
                 CREATE TABLE test_switches (name text PRIMARY KEY);",
            )
            .execute(&mut conn)
            .await
            .expect("test tables");
            conn.close().await.expect("close template connection");
        })
        .await;
}

/// A fresh, migrated database.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
}

/// Creates a fresh database from the migrated template.
pub async fn test_db() -> TestDb {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    template_ready().await;
    let server = server();
    let name = format!("t_{}_{}", std::process::id(), COUNTER.fetch_add(1, Ordering::SeqCst));
    let mut admin = PgConnection::connect(&server.admin_url)
        .await
        .expect("connect as admin");
    let mut tries = 0;
    loop {
        let created = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "CREATE DATABASE {name} TEMPLATE {TEMPLATE}"
        )))
        .execute(&mut admin)
        .await;
        match created {
            Ok(_) => break,
            // Another test copying the template at the same moment.
            Err(e) if tries < 50 && e.to_string().contains("being accessed by other users") => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("create test database: {e}"),
        }
    }
    admin.close().await.expect("close admin");
    let url = (server.url_of)(&name);
    let pool = pg::pool(
        &url,
        &PoolConfig {
            max_connections: 20,
            ..PoolConfig::default()
        },
    )
    .expect("pool");
    TestDb { name, url, pool }
}

/// Engine settings that make tests quick without real waits of seconds.
pub fn fast_config(node: &str) -> EngineConfig {
    EngineConfig {
        node_id: node.to_string(),
        lease_ttl: Duration::from_secs(5),
        max_concurrent_runs: 16,
        claim_batch: 16,
        poll_interval: Duration::from_millis(200),
        recovery_interval: Duration::from_millis(100),
        shutdown_grace: Duration::from_secs(5),
        fuse_local_steps: true,
        ..EngineConfig::default()
    }
}

/// Polls `check` every 20 ms until it returns Some, or panics after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
