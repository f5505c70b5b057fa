//! Load generators of the benchmark, and the SQL they need (the ceiling table, identities,
//! commit and run counts).

use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use sagaflow::engine::{EngineConfig, Faults, TriggerOptions};
use serde::Serialize;
use serde_json::{Value, json};
use sqlx::PgPool;

use super::BenchOptions;
use super::measure::{Latency, cluster_cpu_seconds, cpu_seconds};

/// The token the bench's server children accept.
pub const TOKEN: &str = "bench-token-0123456789abcdef0123456789";
/// The admin token of the server under test (the load needs none; it must differ).
pub const ADMIN_TOKEN: &str = "bench-admin-token-0123456789abcdef0123";
const WORKFLOW: &str = "create-customer-account";
/// Steps of `create-customer-account`, from its plan.
fn steps() -> f64 {
    sagaflow::workflows::customer_account::workflow().steps().len() as f64
}

/// What a closed- or open-loop phase measured.
#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    /// Runs completed.
    pub runs: usize,
    /// Runs completed per second.
    pub runs_per_s: f64,
    /// Steps completed per second.
    pub steps_per_s: f64,
    /// Transactions committed (writing ones, all of the cluster) per run: transaction ids
    /// drawn, less the savepoints taken (a batch member's savepoint draws one too).
    pub commits_per_run: f64,
    /// Statements the bench's database executed per run (`pg_stat_statements`, utility
    /// statements such as BEGIN and COMMIT included), when it is installed. sqlx does not
    /// pipeline, so each is also one round trip.
    pub statements_per_run: Option<f64>,
    /// Steps in a run of the workload's workflow.
    pub steps_per_run: f64,
    /// Trigger to completion.
    pub latency_ms: Latency,
    /// CPU seconds the server process used (HTTP phases).
    pub server_cpu_s: Option<f64>,
    /// CPU seconds the bench's own process used meanwhile (the clients).
    pub client_cpu_s: Option<f64>,
    /// CPU seconds the PostgreSQL cluster used (all its processes), when it runs on this
    /// machine: less noisy than a rate on a shared machine, so what an A/B of a change to
    /// the hot path compares.
    pub postgres_cpu_s: Option<f64>,
    /// The phase ran in the bench's process, no server child (the library, the SQL alone):
    /// its clients' CPU is all that is not PostgreSQL's.
    #[serde(skip)]
    pub in_process: bool,
}

/// What the recovery phase measured.
#[derive(Debug, Clone, Serialize)]
pub struct Recovery {
    /// Runs not finished when the server was killed.
    pub runs_in_flight: usize,
    /// From the restart until every run was terminal.
    pub recovery_s: f64,
    /// From the restart until the last of the killed server's runs was taken over.
    pub takeover_s: f64,
    /// Of which: until the restarted server listened.
    pub restart_s: f64,
}

/// Single-row INSERT + COMMIT throughput with `writers` concurrent writers for `length`.
pub async fn ceiling(pool: &PgPool, writers: usize, length: Duration) -> Result<Ceiling> {
    sqlx::raw_sql("CREATE TABLE IF NOT EXISTS bench_ceiling (id bigserial PRIMARY KEY, payload text NOT NULL)")
        .execute(pool)
        .await?;
    let done = Arc::new(AtomicUsize::new(0));
    let postgres = CpuSince::postgres(pool).await;
    let client = CpuSince::process(std::process::id());
    let deadline = Instant::now() + length;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..writers {
        let (pool, done) = (pool.clone(), Arc::clone(&done));
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                sqlx::query("INSERT INTO bench_ceiling (payload) VALUES ($1)")
                    .bind("a row of about the size of a step's record")
                    .execute(&pool)
                    .await?;
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<(), sqlx::Error>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let commits = done.load(Ordering::Relaxed).max(1) as f64;
    Ok(Ceiling {
        commits_per_s: commits / elapsed,
        postgres_cpu_ms: postgres.used().map(|s| s * 1000.0 / commits),
        client_cpu_ms: client.used().map(|s| s * 1000.0 / commits),
    })
}

/// What the ceiling phase measured.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Ceiling {
    /// Single-row commits per second.
    pub commits_per_s: f64,
    /// PostgreSQL's CPU milliseconds per commit (all its processes).
    pub postgres_cpu_ms: Option<f64>,
    /// The writers' CPU milliseconds per commit (this process).
    pub client_cpu_ms: Option<f64>,
}

/// `count` auth identities `authid_<prefix><i>` for registrations.
pub async fn create_identities(pool: &PgPool, prefix: &str, count: usize) -> Result<()> {
    sqlx::query(
        "INSERT INTO auth_identities (id, provider, entity_id)
         SELECT 'authid_' || $1 || g, 'emailpass', $1 || g || '@bench.example' FROM generate_series(0, $2 - 1) g
         ON CONFLICT DO NOTHING",
    )
    .bind(prefix)
    .bind(count as i64)
    .execute(pool)
    .await?;
    Ok(())
}

fn registration(prefix: &str, i: usize) -> Value {
    json!({"authIdentityId": format!("authid_{prefix}{i}"),
           "customerData": {"email": format!("{prefix}{i}@bench.example"), "first_name": "Bench"}})
}

/// Writing transactions of the whole cluster so far (each one assigned a transaction id).
async fn xid(pool: &PgPool) -> Result<i64> {
    Ok(sqlx::query_scalar("SELECT pg_current_xact_id()::text::int8")
        .fetch_one(pool)
        .await?)
}

/// A histogram of counts the server keeps (runs per batch commit, `sagaflow_batch_runs`; runs
/// per cohort, `sagaflow_cohort_runs`), cumulative per bucket as Prometheus reports it.
#[derive(Debug, Clone, Default)]
pub struct CountHistogram {
    /// (upper bound, batches with at most that many runs).
    buckets: Vec<(f64, f64)>,
}

impl CountHistogram {
    /// Reads the histogram `metric` from the server's `/metrics`.
    pub async fn read(base: &str, metric: &str) -> Result<Self> {
        let prefix = format!("{metric}_bucket{{le=\"");
        let text = client()?
            .get(format!("{base}/metrics"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await?
            .text()
            .await?;
        let mut histogram = Self::default();
        for line in text.lines() {
            let Some((name, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else { continue };
            if let Some(le) = name
                .strip_prefix(prefix.as_str())
                .and_then(|rest| rest.strip_suffix("\"}"))
                .and_then(|le| le.parse::<f64>().ok())
            {
                histogram.buckets.push((le, value));
            }
        }
        Ok(histogram)
    }

    /// What was counted since `before`: (a count, how many times it was counted: e.g. runs
    /// in a batch, batches of that size), for each count that occurred.
    pub fn since(&self, before: &Self) -> Vec<(i64, i64)> {
        let cumulative = |h: &Self, le: f64| h.buckets.iter().find(|(b, _)| *b == le).map_or(0.0, |(_, c)| *c);
        let mut previous = 0.0;
        let mut sizes = Vec::new();
        for &(le, _) in &self.buckets {
            let now = cumulative(self, le) - cumulative(before, le);
            if now > previous {
                sizes.push((le as i64, (now - previous) as i64));
            }
            previous = now;
        }
        sizes
    }
}

/// CPU time used since a phase began, by a process or by a PostgreSQL cluster (`None` when
/// it cannot be read, e.g. a database on another host).
struct CpuSince {
    read: Reading,
    before: Option<f64>,
}

/// Whose CPU time a [`CpuSince`] reads.
#[derive(Clone, Copy)]
enum Reading {
    Process(u32),
    /// The cluster of this backend.
    Cluster(u32),
    Unknown,
}

impl Reading {
    fn seconds(self) -> Option<f64> {
        match self {
            Self::Process(pid) => cpu_seconds(pid),
            Self::Cluster(backend) => cluster_cpu_seconds(backend),
            Self::Unknown => None,
        }
    }
}

impl CpuSince {
    fn start(read: Reading) -> Self {
        Self {
            read,
            before: read.seconds(),
        }
    }

    fn process(pid: u32) -> Self {
        Self::start(Reading::Process(pid))
    }

    /// The cluster `pool` is connected to.
    async fn postgres(pool: &PgPool) -> Self {
        let backend: Option<i32> = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(pool).await.ok();
        Self::start(
            backend
                .and_then(|pid| u32::try_from(pid).ok())
                .map_or(Reading::Unknown, Reading::Cluster),
        )
    }

    /// CPU seconds used since the start.
    fn used(&self) -> Option<f64> {
        Some(self.read.seconds()? - self.before?)
    }
}

/// What the database has done so far: transactions that wrote, and statements executed in
/// the bench's database (`None` without `pg_stat_statements`).
struct DbCounters {
    xid: i64,
    statements: Option<i64>,
    /// Savepoints taken: each one that writes draws a transaction id too, so they are not
    /// commits.
    savepoints: i64,
}

impl DbCounters {
    async fn read(pool: &PgPool) -> Result<Self> {
        let counted: Option<(Option<i64>, Option<i64>)> = sqlx::query_as(
            "SELECT sum(calls)::int8, sum(calls) FILTER (WHERE query ILIKE 'SAVEPOINT%')::int8 FROM pg_stat_statements
             WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .fetch_one(pool)
        .await
        .ok();
        let (statements, savepoints) = counted.unwrap_or((None, None));
        Ok(Self {
            xid: xid(pool).await?,
            statements,
            savepoints: savepoints.unwrap_or(0),
        })
    }

    /// Commits and statements per run since `self`.
    async fn per_run(&self, pool: &PgPool, runs: usize) -> Result<(f64, Option<f64>)> {
        let now = Self::read(pool).await?;
        let runs = runs.max(1) as f64;
        let statements = now.statements.zip(self.statements).map(|(b, a)| (b - a) as f64 / runs);
        let commits = (now.xid - self.xid) - (now.savepoints - self.savepoints);
        Ok((commits as f64 / runs, statements))
    }
}

fn client() -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .timeout(Duration::from_secs(60))
        .build()?)
}

async fn register(client: &reqwest::Client, base: &str, body: &Value, wait_ms: u32) -> Result<Value> {
    trigger(client, base, WORKFLOW, body, wait_ms).await
}

async fn trigger(client: &reqwest::Client, base: &str, workflow: &str, body: &Value, wait_ms: u32) -> Result<Value> {
    let response = client
        .post(format!("{base}/v1/workflows/{workflow}/runs?wait_ms={wait_ms}"))
        .bearer_auth(TOKEN)
        .json(body)
        .send()
        .await?;
    let status = response.status();
    let body: Value = response.json().await?;
    if !status.is_success() {
        bail!("trigger answered {status}: {body}");
    }
    Ok(body)
}

/// What a closed-loop phase triggers: a workflow, and the input of its `i`-th run.
pub struct Workload {
    /// The workflow's name.
    pub workflow: String,
    /// Steps of one run.
    pub steps: f64,
    /// The input of run `i`.
    pub input: Box<dyn Fn(usize) -> Value + Send + Sync>,
}

impl Workload {
    /// `create-customer-account` registrations of identities `authid_<prefix><i>`.
    pub fn registrations(prefix: &str) -> Self {
        let prefix = prefix.to_string();
        Self {
            workflow: WORKFLOW.into(),
            steps: steps(),
            input: Box::new(move |i| registration(&prefix, i)),
        }
    }
}

/// Registrations `from..from+runs` over HTTP from `clients` clients, each waiting for its run
/// to finish before sending the next.
pub async fn http_closed_loop(
    pool: &PgPool,
    base: &str,
    prefix: &str,
    from: usize,
    runs: usize,
    clients: usize,
    server_pid: u32,
) -> Result<Phase> {
    closed_loop(
        pool,
        base,
        Workload::registrations(prefix),
        from,
        runs,
        clients,
        server_pid,
    )
    .await
}

/// Runs `from..from+runs` of `load` over HTTP from `clients` clients, each waiting for its
/// run to finish before sending the next.
pub async fn closed_loop(
    pool: &PgPool,
    base: &str,
    load: Workload,
    from: usize,
    runs: usize,
    clients: usize,
    server_pid: u32,
) -> Result<Phase> {
    let client = client()?;
    let load = Arc::new(load);
    // Warm up connections and caches.
    trigger(&client, base, &load.workflow, &(load.input)(from + runs * 2), 30_000).await?;
    let server = CpuSince::process(server_pid);
    let client_cpu = CpuSince::process(std::process::id());
    let postgres = CpuSince::postgres(pool).await;
    let before = DbCounters::read(pool).await?;
    let started = Instant::now();
    let (base, steps_per_run) = (base.to_string(), load.steps);
    let mut latencies = each_from_tasks(runs, clients, move |i| {
        let (client, base, load) = (client.clone(), base.clone(), Arc::clone(&load));
        async move {
            let run = trigger(&client, &base, &load.workflow, &(load.input)(from + i), 30_000).await?;
            if run["status"] != "completed" {
                bail!("run {} ended {}", run["id"], run["status"]);
            }
            Ok(())
        }
    })
    .await?;
    let elapsed = started.elapsed().as_secs_f64();
    let (commits_per_run, statements_per_run) = before.per_run(pool, runs).await?;
    let (server_cpu_s, client_cpu_s, postgres_cpu_s) = (server.used(), client_cpu.used(), postgres.used());
    Ok(Phase {
        runs,
        runs_per_s: runs as f64 / elapsed,
        steps_per_s: runs as f64 * steps_per_run / elapsed,
        steps_per_run,
        commits_per_run,
        statements_per_run,
        latency_ms: Latency::of(&mut latencies),
        server_cpu_s,
        client_cpu_s,
        postgres_cpu_s,
        in_process: false,
    })
}

/// Registrations at a fixed `rate` (open loop: one is sent every 1/rate seconds whether or not
/// earlier ones finished) for `length`, using identities `from..to`.
pub async fn http_open_loop(
    base: &str,
    prefix: &str,
    from: usize,
    to: usize,
    rate: f64,
    length: Duration,
) -> Result<Phase> {
    let client = client()?;
    let rate = rate.max(1.0);
    let count = ((rate * length.as_secs_f64()) as usize).clamp(1, to - from);
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(count);
    for i in from..from + count {
        ticker.tick().await;
        let (client, base, body) = (client.clone(), base.to_string(), registration(prefix, i));
        tasks.push(tokio::spawn(async move {
            let sent = Instant::now();
            let run = register(&client, &base, &body, 30_000).await?;
            if run["status"] != "completed" {
                bail!("run {} ended {}", run["id"], run["status"]);
            }
            Ok::<_, anyhow::Error>(sent.elapsed())
        }));
    }
    let mut latencies = Vec::with_capacity(count);
    for task in tasks {
        latencies.push(task.await??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    Ok(Phase {
        runs: count,
        runs_per_s: count as f64 / elapsed,
        steps_per_s: count as f64 * steps() / elapsed,
        steps_per_run: steps(),
        commits_per_run: f64::NAN,
        statements_per_run: None,
        latency_ms: Latency::of(&mut latencies),
        server_cpu_s: None,
        client_cpu_s: None,
        postgres_cpu_s: None,
        in_process: false,
    })
}

/// The library phase's engine: the server's defaults, with the bench's commit lanes.
pub fn library_config(options: &BenchOptions) -> EngineConfig {
    EngineConfig {
        node_id: "bench-library".into(),
        commit_lanes: options.commit_lanes,
        ..EngineConfig::default()
    }
}

/// Registrations through the engine in this process (no HTTP), each caller waiting for its
/// run with [`sagaflow::engine::Engine::trigger_and_wait`]. The engine gets the server's two
/// pools (`pools`, from [`sagaflow::pg::Pools::split`]: the worker's plans each statement
/// once), so that the phase compares with the HTTP one; `pool` is the bench's, for counting.
pub async fn library(pool: &PgPool, pools: sagaflow::pg::Pools, prefix: &str, options: &BenchOptions) -> Result<Phase> {
    in_process_runs(pool, pools, WORKFLOW, &Default::default(), prefix, options).await
}

/// The workflow of [`engine_alone`].
pub const ENGINE_ALONE: &str = "bench-engine-alone";

/// The registration's shape with steps that do nothing: what [`library`] runs, but of a
/// workflow ([`ENGINE_ALONE`]) whose five local steps and finish hook touch no table, with
/// the registration's subject (so its runs batch in the lanes as registrations do). What the
/// engine costs by itself per run: its run, step and log rows, its decisions, its lanes. Beside
/// the set-based SQL it bounds what set-based batch steps could reach with today's executor.
pub async fn engine_alone(
    pool: &PgPool,
    pools: sagaflow::pg::Pools,
    prefix: &str,
    options: &BenchOptions,
) -> Result<Phase> {
    let application = sagaflow::server::Application {
        workflows: vec![nothing_workflow()?],
        hooks: Vec::new(),
    };
    in_process_runs(pool, pools, ENGINE_ALONE, &application, prefix, options).await
}

/// [`ENGINE_ALONE`]: five local steps and a finish hook that do nothing, the registration's
/// subject.
fn nothing_workflow() -> Result<sagaflow::engine::Workflow> {
    use sagaflow::engine::{StepDef, Workflow};
    let mut builder = Workflow::builder(ENGINE_ALONE, 1).subject(|input| {
        input["customerData"]["email"]
            .as_str()
            .map(sagaflow::domain::normalize_email)
    });
    for step in ["one", "two", "three", "four", "five"] {
        builder = builder.step(StepDef::new(step, Nothing).local());
    }
    Ok(builder.on_finish(Nothing).build()?)
}

/// A step and a finish hook that do nothing.
struct Nothing;

#[async_trait::async_trait]
impl sagaflow::engine::Step for Nothing {
    type Output = ();

    async fn invoke(&self, _ctx: &mut sagaflow::engine::StepContext<'_>) -> Result<(), sagaflow::engine::StepError> {
        Ok(())
    }
}

#[async_trait::async_trait]
impl sagaflow::engine::FinishHook for Nothing {
    async fn on_finish(
        &self,
        _db: &mut sqlx::PgConnection,
        _run_id: uuid::Uuid,
        _status: sagaflow::engine::RunStatus,
    ) -> Result<(), sagaflow::engine::StepError> {
        Ok(())
    }
}

/// Registrations' inputs as runs of `workflow` through an engine in this process that has the
/// built-in workflows and `application`'s, each caller waiting for its run to complete.
async fn in_process_runs(
    pool: &PgPool,
    pools: sagaflow::pg::Pools,
    workflow: &'static str,
    application: &sagaflow::server::Application,
    prefix: &str,
    options: &BenchOptions,
) -> Result<Phase> {
    let (runs, tasks_count) = (options.runs, options.concurrency);
    let engine = sagaflow::server::build_engine_with(
        pools,
        library_config(options),
        Faults::none(),
        &Default::default(),
        application,
    )?;
    let worker = engine.start_worker().await?;
    let measured = InProcess::start(pool).await?;
    let prefix = prefix.to_string();
    let latencies = each_from_tasks(runs, tasks_count, move |i| {
        let (engine, input) = (engine.clone(), registration(&prefix, i));
        async move {
            // As the HTTP phase's clients wait (`wait_ms`), so that the two compare.
            let waited = engine
                .trigger_and_wait(workflow, input, TriggerOptions::default(), Duration::from_secs(30))
                .await?;
            let status = waited.detail.map(|d| d.run.status);
            if status != Some(sagaflow::engine::RunStatus::Completed) {
                bail!("run {} ended {status:?}", waited.triggered.run_id);
            }
            Ok(())
        }
    })
    .await?;
    let phase = measured.phase(pool, latencies).await?;
    worker.shutdown().await;
    Ok(phase)
}

/// Runs `work(i)` for `i` in `0..runs` from `tasks` tasks, each taking the next index when
/// it is done with the last; how long each took.
async fn each_from_tasks<F, Fut>(runs: usize, tasks: usize, work: F) -> Result<Vec<Duration>>
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send,
{
    chunks_from_tasks(runs, tasks, 1, move |chunk| work(chunk.start)).await
}

/// Runs `work` on `0..runs` cut in chunks of up to `size` indexes from `tasks` tasks, each
/// taking the next chunk when it is done with the last; how long each index's chunk took,
/// once per index.
async fn chunks_from_tasks<F, Fut>(runs: usize, tasks: usize, size: usize, work: F) -> Result<Vec<Duration>>
where
    F: Fn(std::ops::Range<usize>) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send,
{
    let size = size.max(1);
    let next = Arc::new(AtomicUsize::new(0));
    let mut spawned = Vec::with_capacity(tasks);
    for _ in 0..tasks {
        let (next, work) = (Arc::clone(&next), work.clone());
        spawned.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let from = next.fetch_add(size, Ordering::Relaxed);
                if from >= runs {
                    return Ok::<_, anyhow::Error>(latencies);
                }
                let chunk = from..(from + size).min(runs);
                let sent = Instant::now();
                let items = chunk.len();
                work(chunk).await?;
                latencies.extend(std::iter::repeat_n(sent.elapsed(), items));
            }
        }));
    }
    let mut latencies = Vec::with_capacity(runs);
    for task in spawned {
        latencies.extend(task.await??);
    }
    Ok(latencies)
}

/// What a phase in the bench's own process measures from its start: PostgreSQL's CPU, the
/// process's, the database's commits and statements, the time.
struct InProcess {
    postgres: CpuSince,
    clients: CpuSince,
    before: DbCounters,
    started: Instant,
}

impl InProcess {
    async fn start(pool: &PgPool) -> Result<Self> {
        Ok(Self {
            postgres: CpuSince::postgres(pool).await,
            clients: CpuSince::process(std::process::id()),
            before: DbCounters::read(pool).await?,
            started: Instant::now(),
        })
    }

    /// The phase, once its registrations, which took `latencies`, are done.
    async fn phase(self, pool: &PgPool, mut latencies: Vec<Duration>) -> Result<Phase> {
        let elapsed = self.started.elapsed().as_secs_f64();
        let runs = latencies.len();
        let (postgres_cpu_s, client_cpu_s) = (self.postgres.used(), self.clients.used());
        let (commits_per_run, statements_per_run) = self.before.per_run(pool, runs).await?;
        Ok(Phase {
            runs,
            runs_per_s: runs as f64 / elapsed,
            steps_per_s: runs as f64 * steps() / elapsed,
            steps_per_run: steps(),
            commits_per_run,
            statements_per_run,
            latency_ms: Latency::of(&mut latencies),
            server_cpu_s: None,
            client_cpu_s,
            postgres_cpu_s,
            in_process: true,
        })
    }
}

/// The registration's own SQL and nothing else: each of `tasks` takes registrations one after
/// another and runs, in one transaction per registration, the statements the workflow's steps
/// and finish hook run (the same `domain::store` calls, in the same order), with no engine,
/// no run, no log and no HTTP. What a backend doing the registration by hand would cost the
/// database (without the durability of its steps): the ratio no orchestrator running this
/// workflow's SQL once per step can pass at one commit per registration.
pub async fn sql_alone(pool: &PgPool, prefix: &str, runs: usize, tasks_count: usize) -> Result<Phase> {
    use sagaflow::domain::{NewCustomer, store as domain};
    use sagaflow::workflows::customer_account::{CUSTOMER_CREATED_EVENT, CUSTOMER_ID_KEY};
    let measured = InProcess::start(pool).await?;
    let (shared, prefix) = (pool.clone(), prefix.to_string());
    let latencies = each_from_tasks(runs, tasks_count, move |i| {
        let (pool, input) = (shared.clone(), registration(&prefix, i));
        async move {
            let identity = input["authIdentityId"].as_str().unwrap_or_default().to_string();
            let customer: NewCustomer = serde_json::from_value(input["customerData"].clone())?;
            // The run id the steps would have written with; here only a key for the event.
            let run_id = uuid::Uuid::now_v7();
            let mut tx = pool.begin().await?;
            match domain::registration_check(&mut tx, &identity, &customer.email).await? {
                Some((metadata, false)) if metadata.get(CUSTOMER_ID_KEY).is_none_or(Value::is_null) => {}
                found => bail!("registration {i} cannot proceed: {found:?}"),
            }
            let created = domain::insert_customer(&mut tx, &customer, true, run_id).await?;
            domain::hold_event(
                &mut tx,
                run_id,
                CUSTOMER_CREATED_EVENT,
                &domain::customer_created(&created.id),
            )
            .await?;
            let linked = domain::link_identity(&mut tx, &identity, CUSTOMER_ID_KEY, &json!(created.id)).await?;
            if !matches!(linked, domain::Link::Linked(_)) {
                bail!("registration {i}: the identity was not linked: {linked:?}");
            }
            domain::settle_events(&mut tx, run_id, true).await?;
            tx.commit().await?;
            Ok(())
        }
    })
    .await?;
    measured.phase(pool, latencies).await
}

/// How many registrations one transaction of [`sql_set_based`] serves.
pub const SET_BASED_PER_TRANSACTION: usize = 4;

/// How many tasks [`sql_set_based`] runs for `concurrency` registrations in flight.
pub fn set_based_tasks(concurrency: usize) -> usize {
    (concurrency / SET_BASED_PER_TRANSACTION).max(1)
}

/// The registration's own SQL in its set-based form (the design study's O8, not built in the
/// engine): what [`sql_alone`] runs, but each statement serves [`SET_BASED_PER_TRANSACTION`]
/// registrations (`domain::store`'s set-based twins of the same calls), one transaction per
/// group, from `concurrency / SET_BASED_PER_TRANSACTION` tasks, so that as many registrations
/// are in flight as in the other phases. On `pool`, whose plans should be generic, as the
/// worker pool's are. The bound an engine that ran the same step of a batch's runs as one
/// statement, one commit per batch, would approach, less what it writes of the runs.
pub async fn sql_set_based(pool: &PgPool, prefix: &str, runs: usize, concurrency: usize) -> Result<Phase> {
    use sagaflow::domain::{NewCustomer, store as domain};
    use sagaflow::workflows::customer_account::{CUSTOMER_CREATED_EVENT, CUSTOMER_ID_KEY};
    let measured = InProcess::start(pool).await?;
    let (shared, prefix) = (pool.clone(), prefix.to_string());
    let latencies = chunks_from_tasks(
        runs,
        set_based_tasks(concurrency),
        SET_BASED_PER_TRANSACTION,
        move |chunk| {
            let (pool, prefix) = (shared.clone(), prefix.clone());
            async move {
                let inputs: Vec<Value> = chunk.clone().map(|i| registration(&prefix, i)).collect();
                let identities: Vec<String> = inputs
                    .iter()
                    .map(|input| input["authIdentityId"].as_str().unwrap_or_default().to_string())
                    .collect();
                let customers: Vec<NewCustomer> = inputs
                    .iter()
                    .map(|input| serde_json::from_value(input["customerData"].clone()))
                    .collect::<Result<_, _>>()?;
                let run_ids: Vec<uuid::Uuid> = chunk.clone().map(|_| uuid::Uuid::now_v7()).collect();
                let mut tx = pool.begin().await?;
                let checks: Vec<(&str, &str)> = identities
                    .iter()
                    .zip(&customers)
                    .map(|(identity, customer)| (identity.as_str(), customer.email.as_str()))
                    .collect();
                for (found, i) in domain::registration_checks(&mut tx, &checks)
                    .await?
                    .into_iter()
                    .zip(chunk.clone())
                {
                    match found {
                        Some((metadata, false)) if metadata.get(CUSTOMER_ID_KEY).is_none_or(Value::is_null) => {}
                        found => bail!("registration {i} cannot proceed: {found:?}"),
                    }
                }
                let inserts: Vec<(&NewCustomer, bool, uuid::Uuid)> =
                    customers.iter().zip(&run_ids).map(|(c, &run)| (c, true, run)).collect();
                let mut created = Vec::with_capacity(inserts.len());
                for (customer, i) in domain::insert_customers(&mut tx, &inserts)
                    .await?
                    .into_iter()
                    .zip(chunk.clone())
                {
                    created.push(customer.with_context(|| format!("registration {i}: the email has an account"))?);
                }
                let events: Vec<Value> = created.iter().map(|c| domain::customer_created(&c.id)).collect();
                let held: Vec<(uuid::Uuid, &str, &Value)> = run_ids
                    .iter()
                    .zip(&events)
                    .map(|(&run, data)| (run, CUSTOMER_CREATED_EVENT, data))
                    .collect();
                domain::hold_events(&mut tx, &held).await?;
                let values: Vec<Value> = created.iter().map(|c| json!(c.id)).collect();
                let links: Vec<(&str, &Value)> = identities.iter().map(String::as_str).zip(&values).collect();
                for (linked, i) in domain::link_identities(&mut tx, &links, CUSTOMER_ID_KEY)
                    .await?
                    .into_iter()
                    .zip(chunk)
                {
                    if !matches!(linked, domain::Link::Linked(_)) {
                        bail!("registration {i}: the identity was not linked: {linked:?}");
                    }
                }
                let settles: Vec<(uuid::Uuid, bool)> = run_ids.iter().map(|&run| (run, true)).collect();
                domain::settle_events_of(&mut tx, &settles).await?;
                tx.commit().await?;
                Ok(())
            }
        },
    )
    .await?;
    measured.phase(pool, latencies).await
}

/// What the registrations with identities `authid_<prefix><i>` left in the domain's tables:
/// customers with an account, each one's identity linked to it, and its `customer.created`
/// event released for the run that created it. A completed registration leaves one of each,
/// so the bench compares the SQL alone's with the library phase's: the two did the same.
pub async fn domain_writes(pool: &PgPool, prefix: &str) -> Result<DomainWrites> {
    let (customers, linked, released): (i64, i64, i64) = sqlx::query_as(
        "WITH c AS (
             SELECT id, email, created_by_run FROM customers
             WHERE has_account AND email ~ ('^' || $1 || '[0-9]+@bench\\.example$')
         )
         SELECT (SELECT count(*) FROM c),
                -- Each email's identity by its id (`authid_` and the email's local part), so
                -- that the planner looks each up instead of matching every identity's metadata.
                (SELECT count(*) FROM c JOIN auth_identities a ON a.id = 'authid_' || split_part(c.email, '@', 1)
                 WHERE a.app_metadata ->> 'customer_id' = c.id),
                (SELECT count(*) FROM c JOIN outbox_events e ON e.run_id = c.created_by_run
                 WHERE e.status = 'released' AND e.data ->> 'id' = c.id)",
    )
    .bind(prefix)
    .fetch_one(pool)
    .await?;
    Ok(DomainWrites {
        customers,
        linked,
        released,
    })
}

/// Fails unless the `runs` registrations with identities `authid_<prefix><i>` left what
/// completed registrations leave ([`domain_writes`]: one customer, link and released event
/// each), naming `who` wrote them: a phase's figures compare only if it did the same work.
pub async fn wrote_registrations(pool: &PgPool, prefix: &str, runs: usize, who: &str) -> Result<()> {
    let n = runs as i64;
    let wrote = domain_writes(pool, prefix).await?;
    if wrote
        != (DomainWrites {
            customers: n,
            linked: n,
            released: n,
        })
    {
        bail!("{who} did not write what the workflow writes: {wrote:?}, {runs} registrations");
    }
    Ok(())
}

/// See [`domain_writes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DomainWrites {
    /// Customers with an account.
    pub customers: i64,
    /// Of them, linked from their identity.
    pub linked: i64,
    /// Of them, with their event released.
    pub released: i64,
}

/// Keeps `clients` triggers in flight (not waiting for the runs) until a good number of runs
/// is accepted, SIGKILLs the server, and returns how many runs were left unfinished.
pub async fn fill_and_kill(
    pool: &PgPool,
    base: &str,
    prefix: &str,
    identities: usize,
    clients: usize,
    server: &mut Child,
) -> Result<usize> {
    let client = client()?;
    let next = Arc::new(AtomicUsize::new(0));
    let stop = tokio_util::sync::CancellationToken::new();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (client, next, base, prefix, stop) = (
            client.clone(),
            Arc::clone(&next),
            base.to_string(),
            prefix.to_string(),
            stop.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while !stop.is_cancelled() {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= identities {
                    break;
                }
                let _ = register(&client, &base, &registration(&prefix, i), 0).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.kill().context("SIGKILL")?;
    // A SIGKILLed child is reaped at once, but `wait` is a blocking call all the same.
    tokio::task::block_in_place(|| server.wait())?;
    stop.cancel();
    for task in tasks {
        let _ = task.await;
    }
    Ok(sagaflow::check::unfinished_runs(pool).await?.len())
}

/// Seconds from `since` to the last lease takeover logged after it.
pub async fn last_takeover_after(pool: &PgPool, since: chrono::DateTime<chrono::Utc>) -> Result<Option<f64>> {
    Ok(sqlx::query_scalar(
        "SELECT extract(epoch FROM max(at) - $1)::float8 FROM run_events WHERE kind = 'lease_taken_over' AND at > $1",
    )
    .bind(since)
    .fetch_one(pool)
    .await?)
}

/// Waits until every run is terminal.
pub async fn all_terminal(pool: &PgPool, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let unfinished: i64 = sqlx::query_scalar("SELECT count(*) FROM runs WHERE run_status_is_unfinished(status)")
            .fetch_one(pool)
            .await?;
        if unfinished == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{unfinished} runs still unfinished after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::Mutex;

    /// Every index in exactly one chunk, no chunk longer than asked, one latency per index.
    #[tokio::test]
    async fn chunks_cover_every_index_once_and_time_each() {
        for (runs, tasks, size) in [(10, 3, 4), (16, 4, 4), (3, 5, 8), (7, 2, 1), (0, 2, 4)] {
            let seen = Arc::new(Mutex::new(Vec::new()));
            let record = Arc::clone(&seen);
            let latencies = chunks_from_tasks(runs, tasks, size, move |chunk| {
                let record = Arc::clone(&record);
                async move {
                    assert!(!chunk.is_empty() && chunk.len() <= size, "{chunk:?} of at most {size}");
                    record.lock().expect("not poisoned").push(chunk);
                    tokio::task::yield_now().await;
                    Ok(())
                }
            })
            .await
            .expect("no chunk fails");
            let mut indexes: Vec<usize> = seen
                .lock()
                .expect("not poisoned")
                .iter()
                .flat_map(|c| c.clone())
                .collect();
            indexes.sort_unstable();
            assert_eq!(
                indexes,
                (0..runs).collect::<Vec<_>>(),
                "runs {runs}, tasks {tasks}, size {size}"
            );
            assert_eq!(latencies.len(), runs);
        }
    }

    /// A chunk's error ends the phase with it.
    #[tokio::test]
    async fn a_failing_chunk_fails_the_phase() {
        let failed = chunks_from_tasks(8, 2, 4, |chunk| async move {
            if chunk.contains(&5) {
                bail!("registration 5 cannot proceed");
            }
            Ok(())
        })
        .await;
        let error = failed.expect_err("the chunk holding 5 fails");
        assert!(error.to_string().contains("registration 5"), "{error}");
    }
}
