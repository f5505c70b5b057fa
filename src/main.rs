//! The `sagaflow` binary: `serve` (the default), `migrate`, `check`, `bench`.

mod bench;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use sagaflow::engine::EngineConfig;
use sagaflow::http::serve::HttpLimits;
use sagaflow::http::throttle::ThrottleConfig;
use sagaflow::pg::PoolConfig;
use sagaflow::server::{self, Database, ScheduleSettings, ServerConfig};
use sagaflow::telemetry::{self, LogFormat};
use sagaflow::workflows::retention::{self, Retention};

/// The binary's allocator. With glibc's, allocating and freeing took about 15% of the server's
/// CPU under load (the bench's HTTP phase); the library leaves the choice to its embedder.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A durable saga orchestrator on PostgreSQL.
#[derive(Parser, Debug)]
#[command(version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the API, dashboard and workers (the default).
    Serve(Box<ServeArgs>),
    /// Run the database migrations and exit.
    Migrate(DatabaseArgs),
    /// Check the database against the invariants (exit 1 when one is broken).
    Check(DatabaseArgs),
    /// Measure throughput, latency and recovery against PostgreSQL's own ceiling.
    Bench(BenchArgs),
}

#[derive(Args, Debug, Clone)]
struct BenchArgs {
    /// Runs per closed-loop phase.
    #[arg(long, default_value_t = 2000)]
    runs: usize,
    /// Concurrent clients (and writers of the ceiling phase).
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Connection pool size of the server and of the ceiling's writers.
    #[arg(long, default_value_t = 32)]
    pool_size: u32,
    /// An existing PostgreSQL to measure on (a fresh database is created there). Unset: a
    /// private embedded cluster in a temporary directory, with durable settings.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Runs-table sizes for the list-query phase (comma list; 0 to skip).
    #[arg(long, value_delimiter = ',', default_value = "100000,1000000")]
    list_rows: Vec<usize>,
    /// Length of the ceiling and half-load phases.
    #[arg(long, default_value = "8s", value_parser = humantime::parse_duration)]
    phase: Duration,
    /// Commit lanes of the engine under test: the server child's and the library phase's
    /// (0: every run commits alone).
    #[arg(long, env = "SAGAFLOW_COMMIT_LANES", default_value_t = sagaflow::engine::lane::DEFAULT_LANES)]
    commit_lanes: usize,
    /// Print the result as one JSON object, as the last line of stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug, Clone)]
struct DatabaseArgs {
    /// PostgreSQL to use. Unset: start the embedded cluster in --data-dir.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Where the embedded PostgreSQL keeps its data.
    #[arg(long, env = "SAGAFLOW_DATA_DIR", default_value = ".sagaflow")]
    data_dir: PathBuf,
    /// Log format.
    #[arg(long, env = "SAGAFLOW_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Args, Debug, Clone)]
struct ServeArgs {
    #[command(flatten)]
    database: DatabaseArgs,
    /// Address of the API and dashboard.
    #[arg(long, env = "SAGAFLOW_LISTEN", default_value = "127.0.0.1:3000")]
    listen: SocketAddr,
    /// Stable identity of this instance [default: hostname and data dir].
    #[arg(long, env = "SAGAFLOW_NODE_ID")]
    node_id: Option<String>,
    /// How long a lease lasts without a heartbeat before another instance takes the run.
    #[arg(long, env = "SAGAFLOW_LEASE_TTL", default_value = "10s", value_parser = humantime::parse_duration)]
    lease_ttl: Duration,
    /// Runs this instance drives at once.
    #[arg(long, env = "SAGAFLOW_MAX_CONCURRENT_RUNS", default_value_t = 64)]
    max_concurrent_runs: usize,
    /// Database connections at most, the API's share and the worker's together.
    #[arg(long, env = "SAGAFLOW_POOL_SIZE", default_value_t = 32)]
    pool_size: u32,
    /// Of those, how many are kept for the API and dashboard (at least 2, at most half):
    /// stalled steps never take them.
    #[arg(long, env = "SAGAFLOW_API_POOL_SIZE", default_value_t = 8)]
    api_pool_size: u32,
    /// A step's statement waiting this long for a lock fails, retryably, and gives its
    /// connection back [default: half the lease, at most 5s].
    #[arg(long, env = "SAGAFLOW_STEP_LOCK_TIMEOUT", value_parser = humantime::parse_duration)]
    step_lock_timeout: Option<Duration>,
    /// A worker statement running this long is cancelled [default: the lease].
    #[arg(long, env = "SAGAFLOW_STEP_STATEMENT_TIMEOUT", value_parser = humantime::parse_duration)]
    step_statement_timeout: Option<Duration>,
    /// How long shutdown waits for attempts in flight.
    #[arg(long, env = "SAGAFLOW_SHUTDOWN_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    shutdown_grace: Duration,
    /// Fallback polling interval when no notification arrives.
    #[arg(long, env = "SAGAFLOW_POLL_INTERVAL", default_value = "2s", value_parser = humantime::parse_duration)]
    poll_interval: Duration,
    /// Do not run a worker in this instance (API only).
    #[arg(long, env = "SAGAFLOW_NO_WORKER")]
    no_worker: bool,
    /// Commit every attempt on its own, even of local steps (no fused segments).
    #[arg(long, env = "SAGAFLOW_NO_FUSION")]
    no_fusion: bool,
    /// Lanes committing the fused segments of several runs together (0: each on its own; at
    /// most half the worker's connections).
    #[arg(long, env = "SAGAFLOW_COMMIT_LANES", default_value_t = sagaflow::engine::lane::DEFAULT_LANES)]
    commit_lanes: usize,
    /// Runners driving cohorts: waiting triggers' runs of a workflow whose every step has a
    /// batch form go through their steps together, one call per step for all (0: none; at
    /// most a quarter of the worker's connections).
    #[arg(long, env = "SAGAFLOW_COHORT_RUNNERS", default_value_t = sagaflow::engine::DEFAULT_COHORT_RUNNERS)]
    cohort_runners: usize,
    /// The most runs one cohort holds (at most 16).
    #[arg(long, env = "SAGAFLOW_COHORT_MAX_RUNS", default_value_t = sagaflow::engine::DEFAULT_COHORT_RUNS)]
    cohort_max_runs: usize,
    /// How long a cohort's first run waits for peers (0: only those already waiting join;
    /// more trades latency for larger cohorts).
    #[arg(long, env = "SAGAFLOW_COHORT_GATHER", default_value = "0ms", value_parser = humantime::parse_duration)]
    cohort_gather: Duration,
    /// The longest a step may wait for a signal, a completion or time (every wait has a
    /// deadline; none may be later than this).
    #[arg(long, env = "SAGAFLOW_MAX_WAIT", default_value = "30days", value_parser = humantime::parse_duration)]
    max_wait: Duration,
    /// Token for backends (trigger and read) [default: generated and printed].
    #[arg(long, env = "SAGAFLOW_API_TOKEN", hide_env_values = true)]
    api_token: Option<String>,
    /// Token for operators (dashboard and operator actions) [default: generated and printed].
    #[arg(long, env = "SAGAFLOW_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// A JSON file of schedules (`{"schedules": [...]}`) upserted at every start.
    #[arg(long, env = "SAGAFLOW_SCHEDULES")]
    schedules: Option<PathBuf>,
    /// A JSON file of workflow definitions by name (`{"order": {...}}`) upserted at every start.
    #[arg(long, env = "SAGAFLOW_WORKFLOWS")]
    workflows: Option<PathBuf>,
    /// Let defined workflows call, and webhooks deliver to, plain `http` beyond loopback.
    #[arg(long, env = "SAGAFLOW_ALLOW_HTTP_ENDPOINTS")]
    allow_http_endpoints: bool,
    /// How long a webhook delivery is retried (5 s, then ×3 up to an hour apart) before it
    /// is marked failed.
    #[arg(long, env = "SAGAFLOW_WEBHOOK_RETRY_WINDOW", default_value = "24h", value_parser = humantime::parse_duration)]
    webhook_retry_window: Duration,
    /// One webhook delivery attempt's time limit (an attempt a dead instance left is made
    /// again twice that long after it began).
    #[arg(long, env = "SAGAFLOW_WEBHOOK_ATTEMPT_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    webhook_attempt_timeout: Duration,
    /// How long finished runs are kept before the daily retention sweep deletes them.
    #[arg(long, env = "SAGAFLOW_RETENTION", default_value = "30d", value_parser = parse_retention)]
    retention: Duration,
    /// How long a client has to send a request's headers; also how long an idle keep-alive
    /// connection stays open.
    #[arg(long, env = "SAGAFLOW_HEADER_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    header_timeout: Duration,
    /// How long a client has to send a request's body.
    #[arg(long, env = "SAGAFLOW_BODY_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    body_timeout: Duration,
    /// How long a request may take to be answered (a trigger's `wait_ms` is at most 30s).
    #[arg(long, env = "SAGAFLOW_REQUEST_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    request_timeout: Duration,
    /// HTTP connections open at once; more wait in the listen backlog.
    #[arg(long, env = "SAGAFLOW_MAX_CONNECTIONS", default_value_t = 1024)]
    max_connections: usize,
    /// Failed authentications (wrong bearer tokens, failed dashboard logins) an address may
    /// make within --auth-failure-window before it is refused (429) for that long.
    #[arg(long, env = "SAGAFLOW_AUTH_MAX_FAILURES", default_value_t = 10)]
    auth_max_failures: u32,
    /// How long failed authentications are counted, and how long a blocked address waits.
    #[arg(long, env = "SAGAFLOW_AUTH_FAILURE_WINDOW", default_value = "60s", value_parser = humantime::parse_duration)]
    auth_failure_window: Duration,
    /// The shortest `older_than` any retention sweep accepts (at least 1m).
    #[arg(long, env = "SAGAFLOW_RETENTION_FLOOR", default_value = "1d", value_parser = parse_retention)]
    retention_floor: Duration,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let done = match cli.command {
        Some(Command::Migrate(args)) => migrate(args).await,
        Some(Command::Check(args)) => check(args).await,
        Some(Command::Bench(args)) => run_bench(args).await,
        Some(Command::Serve(args)) => serve(*args).await,
        None => serve(cli.serve).await,
    };
    match done {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            // The error and its causes, one line: what a person must fix, never a backtrace
            // (returning it from `main` prints one whenever RUST_BACKTRACE is set).
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn migrate(args: DatabaseArgs) -> anyhow::Result<()> {
    let _log = telemetry::init(args.log_format);
    let database = Database::open_beside_server(args.database_url.as_deref(), &args.data_dir, &PoolConfig::default())
        .await
        .context("migrating the database")?;
    tracing::info!("migrations are up to date");
    database.close().await;
    Ok(())
}

async fn check(args: DatabaseArgs) -> anyhow::Result<()> {
    let _log = telemetry::init(args.log_format);
    let database = Database::open_beside_server(args.database_url.as_deref(), &args.data_dir, &PoolConfig::default())
        .await
        .context("opening the database")?;
    let engine = server::build_engine(
        database.pools(),
        EngineConfig::default(),
        Default::default(),
        &Default::default(),
    )?;
    let violations = sagaflow::check::violations(&database.pool, &engine)
        .await
        .context("checking")?;
    database.close().await;
    for violation in &violations {
        println!("{violation}");
    }
    if violations.is_empty() {
        println!("all invariants hold");
        Ok(())
    } else {
        anyhow::bail!("{} invariant violations", violations.len())
    }
}

async fn run_bench(args: BenchArgs) -> anyhow::Result<()> {
    let _log = telemetry::init(LogFormat::Text);
    let json = args.json;
    let report = bench::run(bench_options(args)).await?;
    println!("{}", report.table());
    if json {
        println!("{}", report.json());
    }
    Ok(())
}

/// What the bench's flags ask of it.
fn bench_options(args: BenchArgs) -> bench::BenchOptions {
    bench::BenchOptions {
        runs: args.runs,
        concurrency: args.concurrency,
        pool_size: args.pool_size,
        database_url: args.database_url,
        list_rows: args.list_rows.into_iter().filter(|n| *n > 0).collect(),
        phase: args.phase,
        commit_lanes: args.commit_lanes,
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let _log = telemetry::init(args.database.log_format);
    // Before anything starts, so that a stop asked for while it starts is heard.
    let stop = server::ShutdownSignal::listen();
    let node_id = match args.node_id {
        Some(id) => id,
        None => default_node_id(&args.database.data_dir),
    };
    let (api_token, admin_token) =
        Token::resolve_both(args.api_token, args.admin_token, &args.database.data_dir).await?;
    let config = ServerConfig {
        listen: args.listen,
        database_url: args.database.database_url,
        data_dir: args.database.data_dir,
        engine: EngineConfig {
            node_id,
            lease_ttl: args.lease_ttl,
            max_concurrent_runs: args.max_concurrent_runs.max(1),
            fuse_local_steps: !args.no_fusion,
            commit_lanes: args.commit_lanes,
            cohort_runners: args.cohort_runners,
            cohort_max_runs: args.cohort_max_runs,
            cohort_gather: args.cohort_gather,
            max_wait: args.max_wait,
            poll_interval: args.poll_interval,
            recovery_interval: (args.lease_ttl / 4).clamp(Duration::from_millis(100), Duration::from_secs(1)),
            shutdown_grace: args.shutdown_grace,
            ..EngineConfig::default()
        },
        pool: PoolConfig {
            max_connections: args.pool_size.max(4),
            api_connections: args.api_pool_size,
            lock_timeout: Some(
                args.step_lock_timeout
                    .unwrap_or_else(|| (args.lease_ttl / 2).min(Duration::from_secs(5))),
            ),
            statement_timeout: Some(args.step_statement_timeout.unwrap_or(args.lease_ttl)),
            idle_in_transaction_timeout: args.lease_ttl,
            ..PoolConfig::default()
        },
        faults: std::env::var("SAGAFLOW_FAULTS").ok().filter(|s| !s.is_empty()),
        run_worker: !args.no_worker,
        api_token: api_token.value.clone(),
        admin_token: admin_token.value.clone(),
        http: HttpLimits {
            header_timeout: args.header_timeout,
            body_timeout: args.body_timeout,
            request_timeout: args.request_timeout,
            max_connections: args.max_connections,
        },
        application: Default::default(),
        defined: server::DefinedSettings {
            file: args.workflows,
            allow_http: args.allow_http_endpoints,
            vars: None,
        },
        webhooks: server::WebhookSettings {
            retry_window: args.webhook_retry_window,
            attempt_timeout: args.webhook_attempt_timeout,
            ..server::WebhookSettings::default()
        },
        auth_throttle: ThrottleConfig {
            max_failures: args.auth_max_failures.max(1),
            window: args.auth_failure_window,
        },
        schedules: ScheduleSettings {
            file: args.schedules,
            retention: Retention {
                default_period: args.retention,
                floor: args.retention_floor,
            },
            ..ScheduleSettings::default()
        },
    };
    let running = server::start(config).await.context("starting sagaflow")?;
    println!(
        "sagaflow is running: http://{}/ (dashboard; API under /v1, spec at /openapi.json)",
        running.addr
    );
    api_token.announce("API token  ");
    admin_token.announce("admin token");
    stop.received().await;
    running.shutdown().await;
    tracing::info!("bye");
    Ok(())
}

/// A retention period or floor: a duration such as `30d` or `12h` (its bounds are checked at
/// start, against each other).
fn parse_retention(text: &str) -> Result<Duration, String> {
    retention::parse_duration("retention", text).map_err(|e| e.message)
}

/// A token from the configuration, or, when unset, the one generated for this data directory.
struct Token {
    value: String,
    /// Where a generated token is kept, and the variable that would choose it instead.
    generated: Option<(std::path::PathBuf, &'static str)>,
}

impl Token {
    /// The API and admin tokens: each the configured one; else the one kept in the data
    /// directory (`api-token`, `admin-token`, mode 0600), generated and written there on
    /// first use. Kept so that a restart neither changes the tokens backends and operators
    /// use nor ends every dashboard session. Both kept files are read before anything is
    /// written, so a bad one changes nothing.
    async fn resolve_both(
        api: Option<String>,
        admin: Option<String>,
        data_dir: &std::path::Path,
    ) -> anyhow::Result<(Self, Self)> {
        let api = Wanted::read(api, "SAGAFLOW_API_TOKEN", data_dir.join("api-token")).await?;
        let admin = Wanted::read(admin, "SAGAFLOW_ADMIN_TOKEN", data_dir.join("admin-token")).await?;
        Ok((api.settle(data_dir).await?, admin.settle(data_dir).await?))
    }

    /// Prints a generated token, so the operator can use it; a configured one is not repeated.
    fn announce(&self, label: &str) {
        match &self.generated {
            Some((path, env)) => println!(
                "  {label}: {}   (generated, kept in {}; set {env} to choose it)",
                self.value,
                path.display()
            ),
            None => println!("  {label}: from the configuration"),
        }
    }
}

/// A token as found before anything is written: configured, kept in its file, or neither.
enum Wanted {
    Configured(String),
    Kept(String, std::path::PathBuf, &'static str),
    Missing(std::path::PathBuf, &'static str),
}

impl Wanted {
    /// What `given` (from `env`) and the file at `path` say; a kept file that holds no valid
    /// token is an error naming it.
    async fn read(given: Option<String>, env: &'static str, path: std::path::PathBuf) -> anyhow::Result<Self> {
        if let Some(value) = given.filter(|t| !t.trim().is_empty()) {
            return Ok(Self::Configured(value));
        }
        match tokio::fs::read_to_string(&path).await {
            Ok(text) => {
                let value = text.trim().to_string();
                anyhow::ensure!(
                    value.len() >= 32 && value.chars().all(|c| c.is_ascii_graphic()),
                    "{} holds no valid token (at least 32 printable characters); delete it to have a new \
                     one generated, or set {env}",
                    path.display()
                );
                Ok(Self::Kept(value, path, env))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::Missing(path, env)),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// The token: a missing one is generated and written to its file (created, mode 0600).
    async fn settle(self, data_dir: &std::path::Path) -> anyhow::Result<Token> {
        let (value, path, env) = match self {
            Self::Configured(value) => return Ok(Token { value, generated: None }),
            Self::Kept(value, path, env) => (value, path, env),
            Self::Missing(path, env) => {
                let value = sagaflow::http::auth::generate_token();
                tokio::fs::create_dir_all(data_dir)
                    .await
                    .with_context(|| format!("creating {}", data_dir.display()))?;
                let mut options = tokio::fs::OpenOptions::new();
                options.write(true).create_new(true).mode(0o600);
                let mut out = options
                    .open(&path)
                    .await
                    .with_context(|| format!("keeping the generated token in {}", path.display()))?;
                tokio::io::AsyncWriteExt::write_all(&mut out, format!("{value}\n").as_bytes())
                    .await
                    .with_context(|| format!("writing {}", path.display()))?;
                (value, path, env)
            }
        };
        Ok(Token {
            value,
            generated: Some((path, env)),
        })
    }
}

/// The hostname plus the data directory: stable across restarts, distinct for two
/// instances on one machine with their own data directories.
fn default_node_id(data_dir: &std::path::Path) -> String {
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".to_string());
    let dir = std::path::absolute(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    format!("{host}:{}", dir.display())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::{Cli, Command, bench_options};

    /// The flag reaches the bench's options; `bench::tests` follows them to the server child's
    /// command line and the library phase's engine.
    #[test]
    fn the_bench_takes_its_commit_lanes_into_its_options() {
        let cli = Cli::try_parse_from(["sagaflow", "bench", "--commit-lanes", "3"]).expect("parses");
        let Some(Command::Bench(args)) = cli.command else {
            panic!("not the bench: {:?}", cli.command);
        };
        assert_eq!(bench_options(args).commit_lanes, 3);
    }

    #[test]
    fn the_bench_refuses_lanes_that_are_not_a_count() {
        for bad in ["-1", "eight", ""] {
            let flag = format!("--commit-lanes={bad}");
            let error = Cli::try_parse_from(["sagaflow", "bench", flag.as_str()])
                .expect_err("a count of lanes is a non-negative integer");
            assert_eq!(
                error.kind(),
                clap::error::ErrorKind::ValueValidation,
                "{bad:?}: {error}"
            );
            assert!(error.to_string().contains("--commit-lanes"), "{bad:?}: {error}");
        }
    }
}
