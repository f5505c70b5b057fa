//! The `serve` command: database (embedded or given), migrations, engine, declared schedules,
//! worker and scheduler, and HTTP, started in that order and stopped in the reverse order.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::defined::{Definitions, Environment, Vars};
use crate::engine::faults::FaultsParseError;
use crate::engine::scheduler::{DeclaredSchedules, ScheduleError, SchedulerConfig, SchedulerHandle};
use crate::engine::{Clock, SystemClock};
use crate::engine::{Engine, EngineConfig, EngineError, Faults, Handler, WorkerHandle, Workflow};
use crate::http::auth::Tokens;
use crate::http::serve::HttpLimits;
use crate::http::throttle::{AuthThrottle, ThrottleConfig};
use crate::http::{self, AppState};
use crate::pg::embedded::{ClusterOptions, EmbeddedError, EmbeddedPostgres};
use crate::pg::{self, PoolConfig};
use crate::webhooks::{WebhookConfig, Webhooks};
use crate::workflows::{self, Builtins, retention};

/// Everything `serve` needs to know.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Where the HTTP server listens (port 0: any free port).
    pub listen: SocketAddr,
    /// An existing PostgreSQL; `None` starts the embedded cluster in `data_dir`.
    pub database_url: Option<String>,
    /// Where the embedded cluster lives.
    pub data_dir: PathBuf,
    /// The engine's settings (node id, lease, concurrency, grace period).
    pub engine: EngineConfig,
    /// The connection pool's settings.
    pub pool: PoolConfig,
    /// `SAGAFLOW_FAULTS` (testing only).
    pub faults: Option<String>,
    /// The token backends use to trigger and read.
    pub api_token: String,
    /// The token operators use (everything the API token can do, plus operator actions).
    pub admin_token: String,
    /// Start the worker and the scheduler (false: API only).
    pub run_worker: bool,
    /// Schedules and the retention sweep.
    pub schedules: ScheduleSettings,
    /// What slow or numerous clients get: connection cap, header, body and answer deadlines.
    pub http: HttpLimits,
    /// How many failed authentications an address may make before it is refused for a while.
    pub auth_throttle: ThrottleConfig,
    /// The embedding application's own workflows and hook handlers, served beside the
    /// built-in ones (see [`Server::builder`]).
    pub application: Application,
    /// Workflows defined as data: the file declaring some, what their endpoints may be.
    pub defined: DefinedSettings,
    /// Outbound webhooks: how long and how often deliveries are retried (their URLs follow
    /// `defined.allow_http`, their secrets are read where `defined.vars` says).
    pub webhooks: WebhookSettings,
}

/// How outbound webhooks are delivered (DESIGN.md §10).
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    /// How long a delivery is retried before it is marked failed (`--webhook-retry-window`).
    pub retry_window: Duration,
    /// The first retry's delay; each next one is three times longer, at most an hour.
    pub first_retry: Duration,
    /// One attempt's time limit.
    pub attempt_timeout: Duration,
    /// How often an idle delivery worker looks for due deliveries.
    pub poll: Duration,
    /// How long past its deadline a wait nobody ended is reported `run.wait_overdue`.
    pub overdue_grace: Duration,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        let config = WebhookConfig::default();
        Self {
            retry_window: config.retry_window,
            first_retry: config.backoff.initial_delay,
            attempt_timeout: config.attempt_timeout,
            poll: config.poll,
            overdue_grace: config.overdue_grace,
        }
    }
}

impl WebhookSettings {
    fn config(&self, defined: &DefinedSettings) -> WebhookConfig {
        let mut config = WebhookConfig {
            retry_window: self.retry_window,
            attempt_timeout: self.attempt_timeout,
            poll: self.poll,
            overdue_grace: self.overdue_grace,
            allow_http: defined.allow_http,
            ..WebhookConfig::default()
        };
        config.backoff.initial_delay = self.first_retry;
        if let Some(vars) = &defined.vars {
            config.vars = Arc::clone(vars);
        }
        config
    }
}

/// Settings of workflows defined as data (docs/contract.md §8).
#[derive(Clone, Default)]
pub struct DefinedSettings {
    /// `--workflows`: a JSON object of definitions by name, upserted at every start.
    pub file: Option<PathBuf>,
    /// `--allow-http-endpoints`: plain `http` base URLs beyond loopback are allowed.
    pub allow_http: bool,
    /// Where the variables definitions name for their secrets are read: the process
    /// environment unless set (an embedding application may read its own secret store).
    pub vars: Option<Vars>,
}

impl DefinedSettings {
    fn environment(&self, max_wait: std::time::Duration) -> Environment {
        let mut env = Environment::process(self.allow_http);
        env.max_wait = max_wait;
        if let Some(vars) = &self.vars {
            env.var = Arc::clone(vars);
        }
        env
    }
}

impl std::fmt::Debug for DefinedSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DefinedSettings")
            .field("file", &self.file)
            .field("allow_http", &self.allow_http)
            .field("vars", &self.vars.as_ref().map(|_| "custom"))
            .finish()
    }
}

/// What an embedding Rust application adds to the server: its workflows and its handlers
/// for hook points (of its workflows or of the built-in ones).
#[derive(Clone, Default)]
pub struct Application {
    /// Workflows to register beside the built-in ones.
    pub workflows: Vec<Workflow>,
    /// `(workflow, hook step, handler)` for hook points.
    pub hooks: Vec<(String, String, Handler)>,
}

impl std::fmt::Debug for Application {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hooks: Vec<(&str, &str)> = self.hooks.iter().map(|(w, s, _)| (w.as_str(), s.as_str())).collect();
        f.debug_struct("Application")
            .field("workflows", &self.workflows)
            .field("hooks", &hooks)
            .finish()
    }
}

impl ServerConfig {
    /// The defaults of `sagaflow serve`: `127.0.0.1:3000`, the embedded PostgreSQL in
    /// `.sagaflow/`, a worker, and the given tokens (at least 32 characters each).
    pub fn new(api_token: impl Into<String>, admin_token: impl Into<String>) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 3000)),
            database_url: None,
            data_dir: PathBuf::from(".sagaflow"),
            engine: EngineConfig::default(),
            pool: PoolConfig::default(),
            faults: None,
            api_token: api_token.into(),
            admin_token: admin_token.into(),
            run_worker: true,
            schedules: ScheduleSettings::default(),
            http: HttpLimits::default(),
            auth_throttle: ThrottleConfig::default(),
            application: Application::default(),
            defined: DefinedSettings::default(),
            webhooks: WebhookSettings::default(),
        }
    }
}

/// Everything `sagaflow serve` has (API, dashboard, schedules, worker, the embedded
/// PostgreSQL), serving an embedding application's own workflows too:
///
/// ```no_run
/// # async fn serve(workflow: sagaflow::engine::Workflow) -> Result<(), sagaflow::server::ServeError> {
/// let config = sagaflow::server::ServerConfig::new(
///     std::env::var("SAGAFLOW_API_TOKEN").unwrap_or_default(),
///     std::env::var("SAGAFLOW_ADMIN_TOKEN").unwrap_or_default(),
/// );
/// sagaflow::server::Server::builder(config).workflow(workflow).run().await
/// # }
/// ```
pub struct Server;

impl Server {
    /// Starts describing a server with this configuration.
    pub fn builder(config: ServerConfig) -> ServerBuilder {
        ServerBuilder { config }
    }
}

/// Builds a [`Server`]: add workflows and hook handlers, then start or run it.
pub struct ServerBuilder {
    config: ServerConfig,
}

impl ServerBuilder {
    /// Serves this workflow beside the built-in ones.
    pub fn workflow(mut self, workflow: Workflow) -> Self {
        self.config.application.workflows.push(workflow);
        self
    }

    /// Registers the handler of a hook point (`create-customer-account`'s
    /// `customers-created`, or one of the application's own workflows).
    pub fn hook(mut self, workflow: &str, step: &str, handler: Handler) -> Self {
        self.config
            .application
            .hooks
            .push((workflow.to_string(), step.to_string(), handler));
        self
    }

    /// Starts it; the caller stops it with [`RunningServer::shutdown`].
    pub async fn start(self) -> Result<RunningServer, ServeError> {
        start(self.config).await
    }

    /// Starts it and serves until SIGTERM or Ctrl-C, then shuts down in order.
    pub async fn run(self) -> Result<(), ServeError> {
        let stop = ShutdownSignal::listen();
        let running = self.start().await?;
        info!(addr = %running.addr, "serving until SIGTERM or Ctrl-C");
        stop.received().await;
        running.shutdown().await;
        Ok(())
    }
}

/// Schedules and the retention sweep.
#[derive(Debug, Clone)]
pub struct ScheduleSettings {
    /// A JSON file of schedules (`{"schedules": [...]}`) upserted at every start.
    pub file: Option<PathBuf>,
    /// How long finished runs are kept (what `retention-sweep` deletes when its input does not
    /// say otherwise), and the shortest period any sweep may use.
    pub retention: retention::Retention,
    /// The scheduler's catch-up bounds and sleeps.
    pub scheduler: SchedulerConfig,
    /// The wall clock schedules run by (tests move a manual one).
    pub clock: Arc<dyn Clock>,
}

impl Default for ScheduleSettings {
    fn default() -> Self {
        Self {
            file: None,
            retention: retention::Retention::default(),
            scheduler: SchedulerConfig::default(),
            clock: Arc::new(SystemClock),
        }
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The embedded PostgreSQL could not be started.
    #[error(transparent)]
    Embedded(#[from] EmbeddedError),
    /// `SAGAFLOW_FAULTS` is malformed.
    #[error(transparent)]
    Faults(#[from] FaultsParseError),
    /// The database could not be reached or set up.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// The migrations failed.
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The engine refused to start.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The workflows file could not be read, or declares a definition that is refused.
    #[error("workflows file {file}: {message}")]
    Workflows {
        /// The file.
        file: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The schedules file could not be read, or declares a schedule that is refused.
    #[error("schedules file {file}: {message}")]
    Schedules {
        /// The file.
        file: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A schedule could not be set up.
    #[error("schedules: {0}")]
    Schedule(#[from] ScheduleError),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// A setting is out of its range.
    #[error("--{setting}: {message}")]
    Config {
        /// The setting, as its command-line flag is spelled.
        setting: String,
        /// What is wrong.
        message: String,
    },
    /// A blocking task failed.
    #[error("internal: {0}")]
    Internal(String),
}

/// The database the server uses, and the embedded cluster behind it if there is one.
pub struct Database {
    /// The pool requests (API, dashboard) use.
    pub pool: PgPool,
    /// The worker's pool: steps, claims, leases, schedules.
    pub worker_pool: PgPool,
    /// The URL it connects to.
    pub url: String,
    embedded: Option<EmbeddedPostgres>,
}

impl Database {
    /// Connects to `database_url`, or starts the embedded cluster of `data_dir`; then runs
    /// the migrations.
    pub async fn open(
        database_url: Option<&str>,
        data_dir: &std::path::Path,
        pool: &PoolConfig,
    ) -> Result<Self, ServeError> {
        let (url, embedded) = match database_url {
            Some(url) => (url.to_string(), None),
            None => {
                let options = ClusterOptions {
                    data_dir: data_dir.to_path_buf(),
                    unsafe_fast: false,
                    statement_stats: false,
                    commit_timestamps: false,
                };
                let cluster = tokio::task::spawn_blocking(move || EmbeddedPostgres::start(&options))
                    .await
                    .map_err(|e| ServeError::Internal(e.to_string()))??;
                pg::create_database_if_missing(&cluster.url("postgres"), pg::embedded::DATABASE_NAME).await?;
                info!(socket = %cluster.socket_dir().display(), "embedded PostgreSQL running");
                (cluster.url(pg::embedded::DATABASE_NAME), Some(cluster))
            }
        };
        let pools = pg::Pools::split(&url, pool)?;
        pg::migrate(&pools.api).await?;
        Ok(Self {
            pool: pools.api,
            worker_pool: pools.worker,
            url,
            embedded,
        })
    }

    /// As [`Database::open`], but when a running server owns the embedded cluster of
    /// `data_dir`, uses that cluster through its socket (leaving it to its owner) instead of
    /// refusing: what a command run beside the server (`sagaflow check`, `migrate`) wants.
    pub async fn open_beside_server(
        database_url: Option<&str>,
        data_dir: &std::path::Path,
        pool: &PoolConfig,
    ) -> Result<Self, ServeError> {
        match Self::open(database_url, data_dir, pool).await {
            Err(ServeError::Embedded(EmbeddedError::DataDirInUse { url: Some(url), .. })) => {
                info!(data_dir = %data_dir.display(), "a running sagaflow owns this data directory; using its database");
                Self::open(Some(&url), data_dir, pool).await
            }
            opened => opened,
        }
    }

    /// Both pools.
    pub fn pools(&self) -> pg::Pools {
        pg::Pools {
            api: self.pool.clone(),
            worker: self.worker_pool.clone(),
        }
    }

    /// Closes the pools and stops the embedded cluster, if any.
    pub async fn close(self) {
        self.pool.close().await;
        self.worker_pool.close().await;
        if let Some(mut cluster) = self.embedded {
            let stopped = tokio::task::spawn_blocking(move || cluster.stop()).await;
            match stopped {
                Ok(Ok(())) => info!("embedded PostgreSQL stopped"),
                Ok(Err(e)) => warn!(error = %e, "stopping the embedded PostgreSQL failed"),
                Err(e) => warn!(error = %e, "stopping the embedded PostgreSQL failed"),
            }
        }
    }
}

/// A started server.
pub struct RunningServer {
    /// The address the HTTP server listens on.
    pub addr: SocketAddr,
    /// The engine.
    pub engine: Engine,
    database: Database,
    worker: Option<WorkerHandle>,
    scheduler: Option<SchedulerHandle>,
    http: tokio::task::JoinHandle<()>,
    stop_http: CancellationToken,
    follow: tokio::task::JoinHandle<()>,
    stop_follow: CancellationToken,
    deliveries: Option<tokio::task::JoinHandle<()>>,
    stop_deliveries: CancellationToken,
}

/// Builds the engine with every built-in workflow, on `pools` (the API's and the worker's).
pub fn build_engine(
    pools: impl Into<pg::Pools>,
    config: EngineConfig,
    faults: Faults,
    schedules: &ScheduleSettings,
) -> Result<Engine, ServeError> {
    build_engine_with(pools, config, faults, schedules, &Application::default())
}

/// [`build_engine`], with the embedding application's workflows and hook handlers.
pub fn build_engine_with(
    pools: impl Into<pg::Pools>,
    config: EngineConfig,
    faults: Faults,
    schedules: &ScheduleSettings,
    application: &Application,
) -> Result<Engine, ServeError> {
    let pools = pools.into();
    let mut builder = Engine::builder(pools.api)
        .worker_pool(pools.worker)
        .config(config)
        .faults(faults)
        .clock(Arc::clone(&schedules.clock));
    for workflow in &application.workflows {
        builder = builder.register(workflow.clone());
    }
    schedules.retention.validate().map_err(|e| ServeError::Config {
        setting: e.field,
        message: e.message,
    })?;
    let builtins = Builtins {
        retention: schedules.retention,
    };
    let mut builder = workflows::register_builtins(builder, &builtins);
    for (workflow, step, handler) in &application.hooks {
        builder = builder.hook(workflow, step, handler.clone());
    }
    let engine = builder
        .build()
        .map_err(|e| ServeError::Engine(EngineError::Definition(e)))?;
    Ok(engine)
}

/// Upserts the schedules the file declares, then creates the built-in daily
/// `retention-sweep` schedule unless a schedule of that name exists (declared, or changed by
/// an operator: theirs wins).
pub async fn declare_schedules(engine: &Engine, settings: &ScheduleSettings) -> Result<(), ServeError> {
    if let Some(file) = &settings.file {
        let refused = |message: String| ServeError::Schedules {
            file: file.clone(),
            message,
        };
        let text = tokio::fs::read_to_string(file)
            .await
            .map_err(|e| refused(e.to_string()))?;
        let declared = DeclaredSchedules::parse(&text).map_err(|e| refused(e.to_string()))?;
        for (i, spec) in declared.schedules.into_iter().enumerate() {
            let name = spec.name.clone();
            engine
                .declare_schedule(spec)
                .await
                .map_err(|e| refused(format!("schedules[{i}] (`{name}`): {e}")))?;
            info!(schedule = %name, "declared schedule upserted");
        }
    }
    if engine.ensure_schedule(retention::default_schedule()).await? {
        info!(
            schedule = retention::NAME,
            expression = retention::DEFAULT_EXPRESSION,
            "built-in schedule created"
        );
    }
    Ok(())
}

/// Starts database, engine, worker and HTTP server.
pub async fn start(config: ServerConfig) -> Result<RunningServer, ServeError> {
    let faults = match &config.faults {
        Some(spec) => {
            let faults = Faults::parse(spec)?;
            if !faults.is_empty() {
                warn!(faults = %spec, "SAGAFLOW_FAULTS is set: this process will abort on purpose (testing only)");
            }
            faults
        }
        None => Faults::none(),
    };
    let tokens = Tokens::configured(&config.api_token, &config.admin_token).map_err(|e| ServeError::Config {
        setting: "api-token/--admin-token".into(),
        message: e.to_string(),
    })?;
    // Installed before anything records, so no early sample is lost.
    let _ = http::metrics::handle();
    let database = Database::open(config.database_url.as_deref(), &config.data_dir, &config.pool).await?;
    let engine = build_engine_with(
        database.pools(),
        config.engine.clone(),
        faults,
        &config.schedules,
        &config.application,
    )?;
    // A changed plan under an old version is refused before any run of it is accepted; an
    // instance with a worker checks when the worker starts (`start_worker`), below.
    if !config.run_worker {
        engine.record_plans().await?;
    }
    let definitions =
        Definitions::new(engine.clone(), config.defined.environment(config.engine.max_wait)).map_err(|e| {
            ServeError::Config {
                setting: "workflows".into(),
                message: format!("cannot build the HTTP client of defined workflows: {e}"),
            }
        })?;
    // Every stored version runs here before the worker claims anything or a run is accepted.
    definitions.refresh().await.map_err(|e| ServeError::Config {
        setting: "workflows".into(),
        message: e.to_string(),
    })?;
    declare_workflows(&definitions, &config.defined).await?;
    let stop_follow = CancellationToken::new();
    let follow = tokio::spawn(definitions.clone().follow(stop_follow.clone()));
    declare_schedules(&engine, &config.schedules).await?;
    let webhooks = Webhooks::new(database.pool.clone(), config.webhooks.config(&config.defined))
        .await
        .map_err(|e| ServeError::Config {
            setting: "webhooks".into(),
            message: e.to_string(),
        })?;
    let stop_deliveries = CancellationToken::new();
    let (worker, scheduler, deliveries) = if config.run_worker {
        let worker = engine.start_worker().await?;
        let scheduler = engine.start_scheduler(config.schedules.scheduler).await?;
        (
            Some(worker),
            Some(scheduler),
            Some(webhooks.start(stop_deliveries.clone())),
        )
    } else {
        (None, None, None)
    };

    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: config.listen,
        source,
    })?;
    let stop_http = CancellationToken::new();
    let state = AppState {
        engine: engine.clone(),
        definitions,
        webhooks,
        pool: database.pool.clone(),
        tokens,
        throttle: AuthThrottle::new(config.auth_throttle),
        dashboard_secret: http::dashboard::store::secret(&database.pool).await?,
        shutdown: stop_http.clone(),
    };
    let app = http::app(Arc::new(state));
    let http = tokio::spawn(http::serve::serve(listener, app, config.http, stop_http.clone()));
    info!(%addr, node_id = %config.engine.node_id, "sagaflow listening");
    Ok(RunningServer {
        addr,
        engine,
        database,
        worker,
        scheduler,
        http,
        stop_http,
        follow,
        stop_follow,
        deliveries,
        stop_deliveries,
    })
}

/// Upserts the definitions a `--workflows` file declares.
pub async fn declare_workflows(definitions: &Definitions, settings: &DefinedSettings) -> Result<(), ServeError> {
    let Some(file) = &settings.file else {
        return Ok(());
    };
    let refused = |message: String| ServeError::Workflows {
        file: file.clone(),
        message,
    };
    let text = tokio::fs::read_to_string(file)
        .await
        .map_err(|e| refused(e.to_string()))?;
    let declared: serde_json::Value = serde_json::from_str(&text).map_err(|e| refused(format!("not JSON: {e}")))?;
    for (name, version, created) in definitions
        .declare(&declared)
        .await
        .map_err(|e| refused(e.to_string()))?
    {
        info!(workflow = %name, version, created, "declared workflow definition upserted");
    }
    Ok(())
}

impl RunningServer {
    /// Stops in reverse order: HTTP (in-flight requests finish), scheduler, worker (attempts
    /// finish, leases are given back), pool, embedded database.
    pub async fn shutdown(self) {
        self.stop_http.cancel();
        match tokio::time::timeout(Duration::from_secs(10), self.http).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, "HTTP server task failed"),
            Err(_) => warn!("HTTP server did not stop in time"),
        }
        self.stop_follow.cancel();
        let _ = self.follow.await;
        self.stop_deliveries.cancel();
        if let Some(deliveries) = self.deliveries {
            let _ = deliveries.await;
        }
        if let Some(scheduler) = self.scheduler {
            scheduler.shutdown().await;
        }
        if let Some(worker) = self.worker {
            worker.shutdown().await;
        }
        self.database.close().await;
    }
}

/// The process's stop signals, SIGTERM and SIGINT (Ctrl-C), listened for from the moment it
/// is created. Create it before the server starts: a signal that arrives while it starts (a
/// process manager that stops it as soon as it is ready) then stops it once started, drained
/// as always, where the default action of an unheard SIGTERM would kill it on the spot.
pub struct ShutdownSignal {
    term: Option<tokio::signal::unix::Signal>,
    interrupt: Option<tokio::signal::unix::Signal>,
}

impl ShutdownSignal {
    /// Starts listening. A signal that cannot be listened for is logged and left to its
    /// default action (the other still stops the server).
    pub fn listen() -> Self {
        use tokio::signal::unix::{SignalKind, signal};
        let listen = |kind: SignalKind, name: &str| match signal(kind) {
            Ok(s) => Some(s),
            Err(e) => {
                warn!(error = %e, signal = name, "cannot listen for a stop signal");
                None
            }
        };
        Self {
            term: listen(SignalKind::terminate(), "SIGTERM"),
            interrupt: listen(SignalKind::interrupt(), "SIGINT"),
        }
    }

    /// Resolves once a stop signal has arrived since [`ShutdownSignal::listen`] (at once if
    /// one already has).
    pub async fn received(mut self) {
        async fn next(signal: Option<&mut tokio::signal::unix::Signal>) {
            match signal {
                Some(signal) => {
                    signal.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            _ = next(self.term.as_mut()) => info!("SIGTERM received"),
            _ = next(self.interrupt.as_mut()) => info!("interrupt received"),
        }
    }
}
