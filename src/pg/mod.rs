//! PostgreSQL: connecting, migrating, and the embedded default cluster.

pub mod embedded;

use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};

/// The schema migrations, embedded in the binary.
pub static MIGRATOR: Migrator = sqlx::migrate!();

/// How a connection pool is set up.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Connections at most.
    pub max_connections: u32,
    /// Of those, how many the server keeps for its API and dashboard ([`Pools::split`]): the
    /// worker's steps never take them, so health checks, reads and triggers are answered
    /// while every step is stalled.
    pub api_connections: u32,
    /// A statement waiting this long for a lock fails (`lock_timeout`); `None`: it waits.
    /// Set on the worker's pool, so a step blocked on a lock gives its connection back and
    /// fails retryably instead of holding the connection for as long as the lock is held.
    pub lock_timeout: Option<Duration>,
    /// A statement running this long is cancelled (`statement_timeout`); `None`: no limit.
    pub statement_timeout: Option<Duration>,
    /// A transaction left idle this long is ended by the server. Engine transactions are
    /// short; this frees the row locks of a process paused (SIGSTOP) inside one, so its runs
    /// can be taken over once its lease expires.
    pub idle_in_transaction_timeout: Duration,
    /// How long to wait for a free connection.
    pub acquire_timeout: Duration,
    /// Plan every statement once per connection (`plan_cache_mode = force_generic_plan`)
    /// instead of once per execution for its first five. Set on the worker's pool
    /// ([`Pools::split`]): its statements are the hot path, and each names its rows by key
    /// or reads a range in index order with a limit, which a generic plan keeps. Not on the
    /// API's: a generic plan cannot see a range's bounds, and the dashboard's counts over a
    /// time range become sequential scans (1.8 s at a million runs).
    pub generic_plans: bool,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            max_connections: 32,
            api_connections: 8,
            lock_timeout: None,
            statement_timeout: None,
            idle_in_transaction_timeout: Duration::from_secs(10),
            acquire_timeout: Duration::from_secs(10),
            generic_plans: false,
        }
    }
}

/// Connects a pool to `url` (no connection is made until one is needed, so a database that
/// is still starting or restarting is waited for, not fatal).
pub fn pool(url: &str, config: &PoolConfig) -> Result<PgPool, sqlx::Error> {
    let millis = |d: Duration| format!("{}ms", d.as_millis().max(1));
    let mut settings = vec![(
        "idle_in_transaction_session_timeout",
        millis(config.idle_in_transaction_timeout),
    )];
    // Set once per connection, so they cost no statement on the hot path.
    if let Some(timeout) = config.lock_timeout {
        settings.push(("lock_timeout", millis(timeout)));
    }
    if let Some(timeout) = config.statement_timeout {
        settings.push(("statement_timeout", millis(timeout)));
    }
    if config.generic_plans {
        settings.push(("plan_cache_mode", "force_generic_plan".to_string()));
    }
    let options = PgConnectOptions::from_str(url)?
        .application_name("sagaflow")
        .options(settings)
        .log_statements(tracing::log::LevelFilter::Trace)
        .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_secs(2));
    Ok(PgPoolOptions::new()
        .max_connections(config.max_connections)
        .acquire_timeout(config.acquire_timeout)
        // A ping before every acquire is a round trip per step; without any, every pooled
        // connection fails once after a database restart. Ping only connections that sat idle:
        // under load they never do, and a restart leaves them idle.
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for > Duration::from_millis(500) {
                    use sqlx::Connection;
                    conn.ping().await?;
                }
                Ok(true)
            })
        })
        .connect_lazy_with(options))
}

/// The server's two pools over one database: one for the API and dashboard, one for the
/// worker (steps, claims, leases, schedules).
#[derive(Debug, Clone)]
pub struct Pools {
    /// Requests: health, reads, triggers, operator actions.
    pub api: PgPool,
    /// Background work, with the lock and statement timeouts of `config`.
    pub worker: PgPool,
}

impl Pools {
    /// Splits `config.max_connections` into the API's share (`api_connections`, at least 2
    /// and at most half) and the worker's (the rest, with `lock_timeout` and
    /// `statement_timeout`, and generic plans; the API's connections have none of them, as
    /// reads must not fail because a step is slow, and its counts need custom plans).
    pub fn split(url: &str, config: &PoolConfig) -> Result<Self, sqlx::Error> {
        let total = config.max_connections.max(4);
        let api_share = config.api_connections.clamp(2, total / 2);
        let api = pool(
            url,
            &PoolConfig {
                max_connections: api_share,
                lock_timeout: None,
                statement_timeout: None,
                generic_plans: false,
                ..config.clone()
            },
        )?;
        let worker = pool(
            url,
            &PoolConfig {
                max_connections: total - api_share,
                generic_plans: true,
                ..config.clone()
            },
        )?;
        Ok(Self { api, worker })
    }
}

impl From<PgPool> for Pools {
    /// One pool for everything (tools and tests that have no requests to protect).
    fn from(pool: PgPool) -> Self {
        Self {
            api: pool.clone(),
            worker: pool,
        }
    }
}

/// Runs the migrations that have not run yet (several instances starting at once are
/// serialized by sqlx's advisory lock).
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}

/// Drops database `name` (forcing its sessions out) and creates it again, empty, on the
/// server `admin_url` reaches: a fresh database for a test binary's template or a bench
/// phase. `name` must be a plain identifier (lowercase letters, digits, `_`).
pub async fn recreate_database(admin_url: &str, name: &str) -> Result<(), sqlx::Error> {
    use sqlx::Connection;
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        return Err(sqlx::Error::Configuration(
            format!("`{name}` is not a plain database name").into(),
        ));
    }
    let mut admin = sqlx::PgConnection::connect(admin_url).await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut admin)
        .await?;
    admin.close().await
}

/// The URL of database `database` on the server of `url` (query parameters such as the
/// socket `host` are kept).
pub fn with_database(url: &str, database: &str) -> String {
    let (head, query) = match url.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (url, None),
    };
    let base = match head.rfind('/') {
        Some(i) if i > head.find("://").map_or(0, |s| s + 2) => &head[..i],
        _ => head,
    };
    match query {
        Some(q) => format!("{base}/{database}?{q}"),
        None => format!("{base}/{database}"),
    }
}

/// Creates database `name` on the server of `admin_url` unless it exists.
pub async fn create_database_if_missing(admin_url: &str, name: &str) -> Result<(), sqlx::Error> {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(admin_url).await?;
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(name)
        .fetch_one(&mut conn)
        .await?;
    if !exists {
        let sql = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&mut conn).await?;
    }
    conn.close().await
}

#[cfg(test)]
mod tests {

    #[tokio::test]
    async fn a_database_name_that_is_not_plain_is_refused_before_connecting() {
        for name in ["", "Bad", "a-b", "x; DROP DATABASE postgres"] {
            let refused = super::recreate_database("postgres://nobody@127.0.0.1:1/postgres", name).await;
            assert!(
                matches!(&refused, Err(sqlx::Error::Configuration(e)) if e.to_string().contains("not a plain database name")),
                "{name}: {refused:?}"
            );
        }
    }
    use std::collections::HashMap;

    use super::{MIGRATOR, with_database};

    /// Migrations are released software: sqlx refuses to start on a database that applied a
    /// migration whose text has changed since. Each migration's checksum on main is recorded in
    /// `migrations/released.sha384`; editing one fails here, as does adding one without
    /// recording it.
    #[test]
    fn released_migrations_are_never_edited() {
        let released: HashMap<i64, (&str, &str)> = include_str!("../../migrations/released.sha384")
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .filter_map(|l| {
                let (file, sum) = l.split_once(' ')?;
                let version = file.split('_').next()?.parse().ok()?;
                Some((version, (file, sum.trim())))
            })
            .collect();
        let mut seen = 0;
        for migration in MIGRATOR.iter() {
            let sum: String = migration.checksum.iter().map(|b| format!("{b:02x}")).collect();
            match released.get(&migration.version) {
                Some((file, recorded)) => assert_eq!(
                    *recorded, sum,
                    "{file} was released and has been edited: restore it and put the change in a new migration"
                ),
                None => panic!(
                    "migration {} ({}) is not recorded: append `{:04}_{}.sql {sum}` to migrations/released.sha384",
                    migration.version,
                    migration.description,
                    migration.version,
                    migration.description.replace(' ', "_")
                ),
            }
            seen += 1;
        }
        assert_eq!(seen, released.len(), "a released migration was deleted");
    }

    #[test]
    fn another_database_on_the_same_server() {
        assert_eq!(
            with_database("postgres://u@localhost:5432/postgres?host=%2Ftmp%2Fx", "t_1"),
            "postgres://u@localhost:5432/t_1?host=%2Ftmp%2Fx"
        );
        assert_eq!(with_database("postgres://u:p@db/app", "t_2"), "postgres://u:p@db/t_2");
        assert_eq!(with_database("postgres://u@db", "t_3"), "postgres://u@db/t_3");
    }
}
