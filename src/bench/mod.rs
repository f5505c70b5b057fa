//! `sagaflow bench`: throughput, latency and recovery measured against PostgreSQL's own
//! ceiling, in one run on one machine (docs/contract.md §7).
//!
//! Phases, each on the same database server:
//! 1. **ceiling**: single-row INSERT + COMMIT at the same concurrency and pool size;
//! 2. **idle**: `create-customer-account` runs triggered over HTTP (`wait_ms`) by one client,
//!    one after another, against a server child process: what one run costs on an idle system;
//! 3. **http**: the same from `C` clients, as fast as it goes (runs/s, commits and statements
//!    per run, server CPU and peak RSS), then open-loop at half that rate for the latency
//!    distribution;
//! 4. **http steps**: a defined three-step saga whose steps are HTTP calls to a participant
//!    in this process that answers at once, triggered like the registrations (closed loop);
//! 5. **library**: the registrations through the engine in this process, no HTTP, each
//!    caller waiting with `trigger_and_wait`;
//! 6. **SQL alone**: the registration's own statements (its steps' and its finish hook's),
//!    one transaction per registration, from `C` tasks, with no orchestrator at all: the
//!    ratio the workflow's SQL itself allows;
//! 7. **recovery**: a server with runs in flight is SIGKILLed and restarted (same node);
//!    seconds from the restart until every run is terminal;
//! 8. **list**: the runs-list query the API and dashboard use, with 100k and 1M runs.
//!
//! This module belongs to the binary (it is a tool at the edge), so it uses anyhow.

mod list;
mod load;
mod measure;
mod participant;
mod report;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use sagaflow::engine::metrics_names as m;
use sagaflow::pg::embedded::{ClusterOptions, EmbeddedPostgres};
use sagaflow::pg::{self, PoolConfig};
use sqlx::PgPool;

pub use report::Report;

/// What `sagaflow bench` was asked to do.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Runs per closed-loop phase.
    pub runs: usize,
    /// Concurrent clients (and ceiling writers).
    pub concurrency: usize,
    /// Connection pool size of the server and of the ceiling writers.
    pub pool_size: u32,
    /// Existing PostgreSQL (a fresh database is created on it); None: a private embedded
    /// cluster in a temporary directory.
    pub database_url: Option<String>,
    /// Sizes of the runs table for the list-query phase (empty: skip it).
    pub list_rows: Vec<usize>,
    /// How long the ceiling and the open-loop phases last.
    pub phase: Duration,
    /// Commit lanes of the engine under test, the server child's and the library phase's
    /// alike (0: every run commits alone).
    pub commit_lanes: usize,
}

/// The database server the bench uses, and how to reach a database on it.
struct Target {
    cluster: Option<EmbeddedPostgres>,
    admin_url: String,
    url_of: Box<dyn Fn(&str) -> String + Send + Sync>,
    temp_dir: Option<PathBuf>,
}

impl Target {
    async fn open(options: &BenchOptions) -> Result<Self> {
        if let Some(url) = &options.database_url {
            let base = url.clone();
            return Ok(Self {
                cluster: None,
                admin_url: url.clone(),
                url_of: Box::new(move |db| sagaflow::pg::with_database(&base, db)),
                temp_dir: None,
            });
        }
        let dir = std::env::temp_dir().join(format!("sagaflow-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
        let data_dir = dir.join("data");
        // Durable settings, as the server runs: the cost of a commit is what is measured.
        let cluster = tokio::task::spawn_blocking(move || {
            EmbeddedPostgres::start(&ClusterOptions {
                data_dir,
                unsafe_fast: false,
                statement_stats: true,
                commit_timestamps: false,
            })
        })
        .await??;
        let admin_url = cluster.url("postgres");
        let admin = cluster.url("postgres");
        Ok(Self {
            cluster: Some(cluster),
            admin_url,
            url_of: Box::new(move |db| sagaflow::pg::with_database(&admin, db)),
            temp_dir: Some(dir),
        })
    }

    /// A fresh, migrated database.
    async fn database(&self, name: &str, pool_size: u32) -> Result<(String, PgPool)> {
        pg::recreate_database(&self.admin_url, name).await?;
        let url = (self.url_of)(name);
        let pool = pg::pool(
            &url,
            &PoolConfig {
                max_connections: pool_size,
                ..PoolConfig::default()
            },
        )?;
        pg::migrate(&pool).await?;
        // Counted per phase when the cluster loaded it (the bench's own cluster does).
        if let Err(e) = sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            .execute(&pool)
            .await
        {
            eprintln!("statements will not be counted: {e}");
        }
        Ok((url, pool))
    }

    async fn close(mut self) {
        if let Some(mut cluster) = self.cluster.take() {
            let _ = tokio::task::spawn_blocking(move || cluster.stop()).await;
        }
        if let Some(dir) = self.temp_dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Runs of the idle phase: enough for a stable median, few enough to take a second or two.
const IDLE_RUNS: usize = 200;

/// Runs every phase and returns the report.
pub async fn run(options: BenchOptions) -> Result<Report> {
    if options.runs == 0 || options.concurrency == 0 {
        bail!("--runs and --concurrency must be at least 1");
    }
    let target = Target::open(&options).await.context("starting the database")?;
    let result = phases(&target, &options).await;
    target.close().await;
    result
}

async fn phases(target: &Target, options: &BenchOptions) -> Result<Report> {
    let mut report = Report::new(options);
    let (url, pool) = target.database("sagaflow_bench", options.pool_size).await?;
    report.postgres = sqlx::query_scalar("SHOW server_version").fetch_one(&pool).await?;

    eprintln!(
        "ceiling: single-row INSERT + COMMIT, {} writers, {:?}",
        options.concurrency, options.phase
    );
    report.ceiling = load::ceiling(&pool, options.concurrency, options.phase).await?;

    let server = ServerChild::start(&url, "bench-http", options).await?;
    load::create_identities(&pool, "h", options.runs * 3).await?;
    load::create_identities(&pool, "i", IDLE_RUNS * 3).await?;
    eprintln!("idle: {IDLE_RUNS} runs from one client, one after another");
    report.http_idle = Some(load::http_closed_loop(&pool, &server.base(), "i", 0, IDLE_RUNS, 1, server.pid()).await?);

    eprintln!("http: {} runs from {} clients", options.runs, options.concurrency);
    let batches_before = load::CountHistogram::read(&server.base(), m::BATCH_RUNS).await?;
    let cohorts_before = load::CountHistogram::read(&server.base(), m::COHORT_RUNS).await?;
    let max = load::http_closed_loop(
        &pool,
        &server.base(),
        "h",
        0,
        options.runs,
        options.concurrency,
        server.pid(),
    )
    .await?;
    report.batch_runs = load::CountHistogram::read(&server.base(), m::BATCH_RUNS)
        .await?
        .since(&batches_before);
    report.cohort_runs = load::CountHistogram::read(&server.base(), m::COHORT_RUNS)
        .await?
        .since(&cohorts_before);
    let rate = max.runs_per_s / 2.0;
    eprintln!(
        "http: open loop at {rate:.0} runs/s (half the maximum) for {:?}",
        options.phase
    );
    let half = load::http_open_loop(&server.base(), "h", options.runs, options.runs * 2, rate, options.phase).await?;
    report.http = Some(max);
    report.http_half_load = Some(half);

    eprintln!(
        "http steps: a defined 3-step saga, {} runs from {} clients",
        options.runs, options.concurrency
    );
    report.http_steps = Some(http_steps(&pool, &server, options).await?);
    report.rss_mb = server.peak_rss_mb();
    server.terminate().await?;

    eprintln!(
        "library: {} runs from {} tasks, no HTTP",
        options.runs, options.concurrency
    );
    load::create_identities(&pool, "l", options.runs).await?;
    let pools = pg::Pools::split(
        &url,
        &PoolConfig {
            max_connections: options.pool_size,
            ..PoolConfig::default()
        },
    )?;
    report.library = Some(load::library(&pool, pools.clone(), "l", options).await?);

    // On the library's pools: the same connections, so the two differ only in the steps.
    eprintln!(
        "engine alone: the registration's shape with steps that do nothing, {} runs from {} tasks",
        options.runs, options.concurrency
    );
    report.engine_alone = Some(load::engine_alone(&pool, pools.clone(), "n", options).await?);
    pools.api.close().await;
    pools.worker.close().await;

    eprintln!(
        "SQL alone: the registration's own statements, {} registrations from {} tasks, no orchestrator",
        options.runs, options.concurrency
    );
    load::create_identities(&pool, "s", options.runs).await?;
    report.sql_alone = Some(load::sql_alone(&pool, "s", options.runs, options.concurrency).await?);
    // Its figures compare only if it wrote what the workflow writes: see that it did.
    load::wrote_registrations(&pool, "l", options.runs, "the library's runs").await?;
    load::wrote_registrations(&pool, "s", options.runs, "the SQL alone").await?;

    eprintln!(
        "SQL set-based: the same statements, {} registrations per statement, from {} tasks, no orchestrator",
        load::SET_BASED_PER_TRANSACTION,
        load::set_based_tasks(options.concurrency)
    );
    load::create_identities(&pool, "b", options.runs).await?;
    let generic = pg::pool(
        &url,
        &PoolConfig {
            max_connections: options.pool_size,
            generic_plans: true,
            ..PoolConfig::default()
        },
    )?;
    report.sql_set_based = Some(load::sql_set_based(&generic, "b", options.runs, options.concurrency).await?);
    generic.close().await;
    load::wrote_registrations(&pool, "b", options.runs, "the set-based SQL").await?;

    eprintln!("recovery: SIGKILL with runs in flight, restart, wait");
    report.recovery = Some(recovery(&pool, &url, options).await?);

    for rows in &options.list_rows {
        eprintln!("list: the runs-list query with {rows} runs");
    }
    if !options.list_rows.is_empty() {
        let (list_url, list_pool) = target.database("sagaflow_bench_list", 8).await?;
        report.list = list::measure(&list_pool, &list_url, &options.list_rows).await?;
        list_pool.close().await;
    }
    pool.close().await;
    Ok(report)
}

/// The HTTP-step workload: a definition stored on the running server, then its runs.
async fn http_steps(pool: &PgPool, server: &ServerChild, options: &BenchOptions) -> Result<load::Phase> {
    let participant = participant::Participant::start().await?;
    let stored = reqwest::Client::new()
        .put(format!("{}/v1/workflow-definitions/bench-http-saga", server.base()))
        .bearer_auth(load::ADMIN_TOKEN)
        .json(&participant.definition())
        .send()
        .await?;
    if !stored.status().is_success() {
        bail!(
            "storing the bench's definition answered {}: {}",
            stored.status(),
            stored.text().await?
        );
    }
    let workload = load::Workload {
        workflow: "bench-http-saga".into(),
        steps: 3.0,
        input: Box::new(|i| serde_json::json!({"order": i})),
    };
    load::closed_loop(
        pool,
        &server.base(),
        workload,
        0,
        options.runs,
        options.concurrency,
        server.pid(),
    )
    .await
}

async fn recovery(pool: &PgPool, url: &str, options: &BenchOptions) -> Result<load::Recovery> {
    load::create_identities(pool, "r", 5000).await?;
    let mut server = ServerChild::start(url, "bench-recovery", options).await?;
    let in_flight = load::fill_and_kill(pool, &server.base(), "r", 5000, 64, &mut server.child).await?;
    let restarted = Instant::now();
    let restarted_at = chrono::Utc::now();
    let server = ServerChild::start(url, "bench-recovery", options).await?;
    let ready = restarted.elapsed();
    load::all_terminal(pool, Duration::from_secs(120)).await?;
    let recovery_s = restarted.elapsed().as_secs_f64();
    let recovery = load::Recovery {
        runs_in_flight: in_flight,
        recovery_s,
        takeover_s: load::last_takeover_after(pool, restarted_at).await?.unwrap_or(f64::NAN),
        restart_s: ready.as_secs_f64(),
    };
    drop(server);
    Ok(recovery)
}

/// The server under test, as a child process of this binary.
struct ServerChild {
    child: Child,
    port: u16,
}

impl ServerChild {
    async fn start(url: &str, node: &str, options: &BenchOptions) -> Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let exe = std::env::current_exe().context("finding this binary")?;
        let child = Self::command(exe, url, node, port, options)
            .spawn()
            .context("starting the server")?;
        let mut server = Self { child, port };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                return Ok(server);
            }
            if let Some(status) = server.child.try_wait()? {
                bail!("the server exited with {status}");
            }
            if Instant::now() > deadline {
                bail!("the server did not start");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The command line of the server under test: `exe serve` on `port`, with the bench's
    /// pool size and commit lanes.
    fn command(exe: PathBuf, url: &str, node: &str, port: u16, options: &BenchOptions) -> Command {
        let mut command = Command::new(exe);
        command
            .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--node-id", node])
            .args(["--pool-size", &options.pool_size.to_string()])
            .args(["--commit-lanes", &options.commit_lanes.to_string()])
            .env("DATABASE_URL", url)
            .env("SAGAFLOW_API_TOKEN", load::TOKEN)
            .env("SAGAFLOW_ADMIN_TOKEN", load::ADMIN_TOKEN)
            .env("RUST_LOG", "warn")
            .env_remove("SAGAFLOW_FAULTS")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        command
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn peak_rss_mb(&self) -> f64 {
        measure::peak_rss_mb(self.child.id()).unwrap_or(f64::NAN)
    }

    /// SIGTERM, then waits for the graceful exit off the runtime's threads.
    async fn terminate(self) -> Result<()> {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM)?;
        // Drop kills and reaps; the child exited by then, so that is only the reaping.
        tokio::task::spawn_blocking(move || {
            let mut server = self;
            server.child.wait()
        })
        .await??;
        Ok(())
    }
}

impl Drop for ServerChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use super::{BenchOptions, ServerChild, load};

    #[test]
    fn the_server_under_test_and_the_library_phase_both_get_the_benchs_lanes() {
        let options = BenchOptions {
            runs: 10,
            concurrency: 2,
            pool_size: 12,
            database_url: None,
            list_rows: Vec::new(),
            phase: Duration::from_secs(1),
            commit_lanes: 3,
        };
        let command = ServerChild::command(PathBuf::from("sagaflow"), "postgres://x/y", "n", 4000, &options);
        let args: Vec<_> = command.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        let after = |flag: &str| {
            args.iter()
                .position(|a| a == flag)
                .and_then(|i| args.get(i + 1))
                .cloned()
        };
        assert_eq!(args.first().map(String::as_str), Some("serve"), "{args:?}");
        assert_eq!(after("--commit-lanes").as_deref(), Some("3"), "{args:?}");
        assert_eq!(after("--pool-size").as_deref(), Some("12"), "{args:?}");
        assert_eq!(load::library_config(&options).commit_lanes, 3);
    }
}
