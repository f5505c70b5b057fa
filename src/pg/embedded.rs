//! The embedded PostgreSQL default: a private cluster started from the server binaries
//! already installed on the machine.
//!
//! With no `DATABASE_URL`, sagaflow runs `initdb` once into its data directory, starts the
//! cluster on a Unix socket that only it uses, and stops it on shutdown. The same code gives
//! every test binary its own throw-away cluster ([`EmbeddedPostgres::start_ephemeral`]).
//!
//! Things this module is careful about:
//! - PostgreSQL refuses to run as root, so as root the cluster runs as the `postgres` user
//!   (the directories it needs are handed to that user).
//! - A previous sagaflow killed with SIGKILL leaves its cluster running (pg_ctl daemonizes
//!   it): a running cluster of our data directory is adopted, not fought with. A stale
//!   `postmaster.pid` from a crashed cluster is left to PostgreSQL, which removes it itself,
//!   and removed by us only if PostgreSQL still refuses to start because of it.
//! - `initdb` is done into a temporary directory and renamed, so a crash during `initdb`
//!   never leaves a half-made cluster behind.
//! - Two sagaflow processes on one data directory would stop each other's database, so the
//!   data directory is locked (an advisory file lock the kernel drops when the process dies).

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{PermissionsExt, chown};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use nix::unistd::{Uid, User};

/// The name of the database sagaflow uses inside its embedded cluster.
pub const DATABASE_NAME: &str = "sagaflow";
/// The superuser `initdb` creates; local connections over the private socket are trusted.
const SUPERUSER: &str = "postgres";
/// The port number names the socket file (`.s.PGSQL.<port>`); no TCP port is opened.
const SOCKET_PORT: u16 = 5432;
/// The longest Unix socket path the kernel accepts, minus room for `/.s.PGSQL.5432`.
const MAX_SOCKET_DIR_LEN: usize = 90;

/// Why the embedded cluster could not be started or stopped.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    /// No PostgreSQL server binaries were found anywhere we looked.
    #[error(
        "no PostgreSQL server binaries (initdb, pg_ctl, postgres) found on PATH, in `pg_config --bindir` \
         or in the usual install directories (searched: {searched}). Install the PostgreSQL server \
         (Debian/Ubuntu: `apt-get install postgresql`; Fedora: `dnf install postgresql-server`; \
         macOS: `brew install postgresql`), point SAGAFLOW_PG_BINDIR at its bin directory, \
         or set DATABASE_URL to use an existing PostgreSQL"
    )]
    BinariesNotFound {
        /// The directories that were searched, for the message.
        searched: String,
    },
    /// Running as root, but there is no unprivileged `postgres` user to run the cluster as.
    #[error(
        "running as root, and PostgreSQL refuses to run as root; create a `postgres` user \
         (e.g. `useradd --system postgres`) or run sagaflow as an unprivileged user"
    )]
    NoUnprivilegedUser,
    /// Another live process uses this data directory.
    #[error(
        "the data directory {} is in use by another sagaflow process{}; give this one its own \
         --data-dir, or share one PostgreSQL between instances with DATABASE_URL",
        data_dir.display(),
        url.as_ref().map(|url| format!(" (its database: DATABASE_URL='{url}')")).unwrap_or_default()
    )]
    DataDirInUse {
        /// The data directory.
        data_dir: PathBuf,
        /// The URL of the cluster that process runs there, when its socket is up.
        url: Option<String>,
    },
    /// A PostgreSQL tool exited with an error.
    #[error("{tool} failed: {output}")]
    Tool {
        /// The tool that failed (`initdb`, `pg_ctl start`, ...).
        tool: String,
        /// What it printed, and the tail of the server log where that helps.
        output: String,
    },
    /// A file-system operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> EmbeddedError + 'a {
    move |source| EmbeddedError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Where the server binaries of an installed PostgreSQL are.
#[derive(Debug, Clone)]
pub struct PgBinaries {
    bin_dir: PathBuf,
}

impl PgBinaries {
    /// Finds `initdb`, `pg_ctl` and `postgres`: only in `SAGAFLOW_PG_BINDIR` when it is set;
    /// otherwise on `PATH`, then in `pg_config --bindir`, then in the distributions' versioned
    /// directories (newest first).
    pub fn find() -> Result<Self, EmbeddedError> {
        if let Some(dir) = std::env::var_os("SAGAFLOW_PG_BINDIR") {
            return Self::find_in(&[PathBuf::from(dir)]);
        }
        let mut candidates: Vec<PathBuf> = Vec::new();
        if let Some(path) = std::env::var_os("PATH") {
            candidates.extend(std::env::split_paths(&path));
        }
        if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
            && out.status.success()
        {
            let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if !dir.is_empty() {
                candidates.push(PathBuf::from(dir));
            }
        }
        candidates.extend(versioned_dirs("/usr/lib/postgresql", "", "bin"));
        candidates.extend(versioned_dirs("/usr", "pgsql-", "bin"));
        candidates.extend(versioned_dirs("/opt/homebrew/opt", "postgresql@", "bin"));
        candidates.extend(versioned_dirs("/usr/local/opt", "postgresql@", "bin"));
        candidates.push(PathBuf::from("/usr/local/pgsql/bin"));
        candidates.push(PathBuf::from("/opt/homebrew/bin"));

        Self::find_in(&candidates)
    }

    /// The first of `candidates` holding all three server binaries.
    pub fn find_in(candidates: &[PathBuf]) -> Result<Self, EmbeddedError> {
        for dir in candidates {
            if ["initdb", "pg_ctl", "postgres"]
                .iter()
                .all(|tool| dir.join(tool).is_file())
            {
                // Resolve symlinks (e.g. /usr/local/bin/initdb -> /usr/lib/postgresql/15/bin)
                // so that all three tools come from the same installation.
                let real = fs::canonicalize(dir.join("initdb"))
                    .ok()
                    .and_then(|p| p.parent().map(Path::to_path_buf))
                    .filter(|d| d.join("pg_ctl").is_file() && d.join("postgres").is_file())
                    .unwrap_or_else(|| dir.clone());
                return Ok(Self { bin_dir: real });
            }
        }
        let searched = candidates
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        Err(EmbeddedError::BinariesNotFound { searched })
    }

    /// The directory holding the binaries.
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    fn tool(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }

    /// Whether the server module `name` is installed beside these binaries (the packages'
    /// layout: `<version>/bin` and `<version>/lib`).
    fn has_module(&self, name: &str) -> bool {
        self.bin_dir
            .parent()
            .is_some_and(|root| root.join("lib").join(format!("{name}.so")).is_file())
    }
}

/// `<root>/<prefix><version>/<suffix>` directories, highest version first.
fn versioned_dirs(root: &str, prefix: &str, suffix: &str) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(root) else {
        return Vec::new();
    };
    let mut found: Vec<(Vec<u32>, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let version = name.strip_prefix(prefix)?;
            let parts: Vec<u32> = version.split('.').map(str::parse).collect::<Result<_, _>>().ok()?;
            Some((parts, e.path().join(suffix)))
        })
        .collect();
    found.sort_by(|a, b| b.0.cmp(&a.0));
    found.into_iter().map(|(_, p)| p).collect()
}

/// The unprivileged account the cluster runs as when sagaflow runs as root.
#[derive(Debug, Clone)]
struct RunAs {
    uid: u32,
    gid: u32,
}

impl RunAs {
    fn for_current_process() -> Result<Option<Self>, EmbeddedError> {
        if !Uid::effective().is_root() {
            return Ok(None);
        }
        let user = User::from_name("postgres")
            .ok()
            .flatten()
            .ok_or(EmbeddedError::NoUnprivilegedUser)?;
        Ok(Some(Self {
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
        }))
    }

    fn chown(&self, path: &Path) -> Result<(), EmbeddedError> {
        chown(path, Some(self.uid), Some(self.gid)).map_err(io_err("cannot hand to the postgres user", path))
    }

    /// Whether the `postgres` user can reach `dir` (every ancestor searchable by it).
    fn can_reach(&self, dir: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        let mut current = Some(dir);
        while let Some(path) = current {
            let Ok(meta) = fs::metadata(path) else { return false };
            let mode = meta.mode();
            let searchable = if meta.uid() == self.uid {
                mode & 0o100 != 0
            } else if meta.gid() == self.gid {
                mode & 0o010 != 0
            } else {
                mode & 0o001 != 0
            };
            if !searchable {
                return false;
            }
            current = path.parent();
        }
        true
    }
}

/// How a cluster is started.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// sagaflow's data directory; the cluster lives in `<data_dir>/pgdata`.
    pub data_dir: PathBuf,
    /// Trade durability against an OS crash for speed (fsync off). For throw-away test clusters
    /// only: a killed or crashed PostgreSQL still recovers every acknowledged commit, as its
    /// writes sit in the OS page cache.
    pub unsafe_fast: bool,
    /// Load `pg_stat_statements`, when it is installed, so that statements can be counted
    /// (the benchmark's statements per run).
    pub statement_stats: bool,
    /// Record when each transaction committed (`track_commit_timestamp`), so that tests can
    /// tell which writes committed together.
    pub commit_timestamps: bool,
}

/// A running private PostgreSQL cluster that this process owns and stops.
#[derive(Debug)]
pub struct EmbeddedPostgres {
    binaries: PgBinaries,
    pgdata: PathBuf,
    socket_dir: PathBuf,
    run_as: Option<RunAs>,
    /// Held for as long as we own the data directory; the kernel releases it if we die.
    _data_dir_lock: Option<File>,
    stopped: bool,
}

impl EmbeddedPostgres {
    /// Starts (or adopts) the cluster of `options.data_dir`, creating it on first use.
    /// This blocks for up to a minute; call it from a blocking context.
    pub fn start(options: &ClusterOptions) -> Result<Self, EmbeddedError> {
        let binaries = PgBinaries::find()?;
        let run_as = RunAs::for_current_process()?;
        fs::create_dir_all(&options.data_dir).map_err(io_err("cannot create data directory", &options.data_dir))?;
        let data_dir =
            fs::canonicalize(&options.data_dir).map_err(io_err("cannot resolve data directory", &options.data_dir))?;
        let Some(lock) = lock_data_dir(&data_dir)? else {
            return Err(EmbeddedError::DataDirInUse {
                url: Self::running_url(&data_dir)?,
                data_dir,
            });
        };
        let cluster_home = cluster_home(&data_dir, run_as.as_ref());
        if cluster_home != data_dir {
            tracing::warn!(
                data_dir = %data_dir.display(),
                cluster = %cluster_home.display(),
                "the postgres user cannot reach the data directory; keeping the cluster elsewhere"
            );
            fs::create_dir_all(&cluster_home).map_err(io_err("cannot create cluster directory", &cluster_home))?;
            fs::set_permissions(&cluster_home, fs::Permissions::from_mode(0o755))
                .map_err(io_err("cannot set permissions of", &cluster_home))?;
        }
        let pgdata = cluster_home.join("pgdata");
        let socket_dir = socket_dir_for(&cluster_home)?;
        prepare_private_dir(&socket_dir, run_as.as_ref())?;

        let cluster = Self {
            binaries,
            pgdata,
            socket_dir,
            run_as,
            _data_dir_lock: Some(lock),
            stopped: false,
        };
        cluster.init_if_needed(&cluster_home, options.unsafe_fast)?;
        let statement_stats = options.statement_stats && cluster.binaries.has_module("pg_stat_statements");
        cluster.write_settings(options.unsafe_fast, statement_stats, options.commit_timestamps)?;
        cluster.ensure_running()?;
        Ok(cluster)
    }

    /// Starts a throw-away cluster in a temporary directory, for tests. It is stopped and its
    /// directory removed when this process exits, however it exits (a small watchdog process
    /// notices the end of a pipe this process holds).
    pub fn start_ephemeral() -> Result<Self, EmbeddedError> {
        // The count keeps two clusters started at the same moment by one process (tests run
        // in parallel) from sharing a directory when the clock reads the same for both.
        static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let base = std::env::temp_dir().join(format!(
            "sagaflow-test-{}-{}-{}",
            std::process::id(),
            STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            short_hash(&format!("{:?}", std::time::SystemTime::now()))
        ));
        fs::create_dir_all(&base).map_err(io_err("cannot create", &base))?;
        fs::set_permissions(&base, fs::Permissions::from_mode(0o755))
            .map_err(io_err("cannot set permissions of", &base))?;
        if let Some(user) = RunAs::for_current_process()? {
            // So that the watchdog, running as that user, can remove the whole directory.
            user.chown(&base)?;
        }
        let cluster = Self::start(&ClusterOptions {
            data_dir: base.clone(),
            unsafe_fast: true,
            statement_stats: false,
            commit_timestamps: true,
        })?;
        cluster.spawn_watchdog(&base)?;
        Ok(cluster)
    }

    /// The connection URL of database `database` in this cluster.
    pub fn url(&self, database: &str) -> String {
        socket_url(&self.socket_dir, database)
    }

    /// The URL of sagaflow's database in the cluster another process runs in `data_dir`
    /// (a server started on it), when that cluster's socket is up; `None` otherwise. So that
    /// `sagaflow check` and `migrate` can work beside a running server instead of refusing.
    pub fn running_url(data_dir: &Path) -> Result<Option<String>, EmbeddedError> {
        let data_dir = fs::canonicalize(data_dir).map_err(io_err("cannot resolve data directory", data_dir))?;
        let run_as = RunAs::for_current_process()?;
        let socket_dir = socket_dir_for(&cluster_home(&data_dir, run_as.as_ref()))?;
        let socket_up = socket_dir.join(format!(".s.PGSQL.{SOCKET_PORT}")).exists();
        Ok(socket_up.then(|| socket_url(&socket_dir, DATABASE_NAME)))
    }

    /// The directory holding the cluster's Unix socket.
    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    /// The cluster's data directory (`PGDATA`).
    pub fn pgdata(&self) -> &Path {
        &self.pgdata
    }

    /// Stops the cluster (fast shutdown: open sessions are disconnected). Idempotent.
    pub fn stop(&mut self) -> Result<(), EmbeddedError> {
        if self.stopped {
            return Ok(());
        }
        self.stopped = true;
        self.pg_ctl(&["stop", "-w", "-t", "60", "-m", "fast"]).map(|_| ())
    }

    /// Stops the cluster abruptly (`pg_ctl -m immediate`): what a database crash looks like.
    /// For tests of reconnection; [`Self::restart`] brings it back.
    pub fn crash(&self) -> Result<(), EmbeddedError> {
        self.pg_ctl(&["stop", "-w", "-t", "60", "-m", "immediate"]).map(|_| ())
    }

    /// Starts the cluster again after [`Self::crash`].
    pub fn restart(&self) -> Result<(), EmbeddedError> {
        self.ensure_running()
    }

    fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new(program);
        if let Some(user) = &self.run_as {
            cmd.uid(user.uid).gid(user.gid);
            // The tools chdir back to the working directory; root's may be unreadable.
            cmd.current_dir("/");
        }
        cmd.env("LC_ALL", "C")
            .env_remove("PGDATA")
            .env_remove("PGHOST")
            .env_remove("PGPORT");
        cmd
    }

    fn run(&self, tool: &str, cmd: &mut Command) -> Result<String, EmbeddedError> {
        let out = cmd.output().map_err(|e| EmbeddedError::Tool {
            tool: tool.into(),
            output: e.to_string(),
        })?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.status.success() {
            Ok(text)
        } else {
            Err(EmbeddedError::Tool {
                tool: tool.into(),
                output: text.trim().to_string(),
            })
        }
    }

    fn pg_ctl(&self, args: &[&str]) -> Result<String, EmbeddedError> {
        let mut cmd = self.command(&self.binaries.tool("pg_ctl"));
        cmd.arg("-D").arg(&self.pgdata).args(args);
        self.run(
            &format!("pg_ctl {}", args.first().copied().unwrap_or_default()),
            &mut cmd,
        )
    }

    fn init_if_needed(&self, cluster_home: &Path, no_sync: bool) -> Result<(), EmbeddedError> {
        if self.pgdata.join("PG_VERSION").is_file() {
            return Ok(());
        }
        let staging = cluster_home.join(format!("pgdata.init-{}", std::process::id()));
        if staging.exists() {
            fs::remove_dir_all(&staging).map_err(io_err("cannot remove", &staging))?;
        }
        prepare_private_dir(&staging, self.run_as.as_ref())?;
        let mut cmd = self.command(&self.binaries.tool("initdb"));
        cmd.arg("-D")
            .arg(&staging)
            .args(["-U", SUPERUSER, "--auth=trust", "-E", "UTF8", "--locale=C"]);
        if no_sync {
            cmd.arg("--no-sync");
        }
        tracing::info!(pgdata = %self.pgdata.display(), "initializing the embedded PostgreSQL cluster");
        self.run("initdb", &mut cmd)?;
        // Our settings live in their own file, rewritten at every start.
        let conf = staging.join("postgresql.conf");
        let mut file = OpenOptions::new()
            .append(true)
            .open(&conf)
            .map_err(io_err("cannot open", &conf))?;
        file.write_all(b"\n# sagaflow: settings of the embedded cluster\ninclude_if_exists = 'sagaflow.conf'\n")
            .map_err(io_err("cannot write", &conf))?;
        if self.pgdata.exists() {
            // A directory without PG_VERSION is what a crash before this rename left behind.
            fs::remove_dir_all(&self.pgdata).map_err(io_err("cannot remove", &self.pgdata))?;
        }
        fs::rename(&staging, &self.pgdata).map_err(io_err("cannot move the new cluster to", &self.pgdata))?;
        Ok(())
    }

    fn write_settings(
        &self,
        unsafe_fast: bool,
        statement_stats: bool,
        commit_timestamps: bool,
    ) -> Result<(), EmbeddedError> {
        let mut settings = format!(
            "listen_addresses = ''\nunix_socket_directories = '{}'\nunix_socket_permissions = 0700\nport = {SOCKET_PORT}\n\
             max_connections = 300\nshared_buffers = 128MB\nlogging_collector = off\n",
            self.socket_dir.to_string_lossy().replace('\'', "''")
        );
        if unsafe_fast {
            // Not synchronous_commit = off: that acknowledges commits PostgreSQL would lose in
            // its own crash, which the database-restart tests cause on purpose. With fsync off,
            // a commit still reaches the OS before it is acknowledged.
            settings.push_str("fsync = off\nfull_page_writes = off\n");
        }
        if commit_timestamps {
            settings.push_str("track_commit_timestamp = on\n");
        }
        if statement_stats {
            settings
                .push_str("shared_preload_libraries = 'pg_stat_statements'\npg_stat_statements.track_utility = on\n");
        }
        let path = self.pgdata.join("sagaflow.conf");
        fs::write(&path, settings).map_err(io_err("cannot write", &path))?;
        if let Some(user) = &self.run_as {
            user.chown(&path)?;
        }
        Ok(())
    }

    fn is_running(&self) -> bool {
        // pg_ctl status: exit 0 = running, 3 = not running, 4 = no data directory.
        let mut cmd = self.command(&self.binaries.tool("pg_ctl"));
        cmd.arg("-D")
            .arg(&self.pgdata)
            .arg("status")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        cmd.status().map(|s| s.success()).unwrap_or(false)
    }

    fn socket_ready(&self) -> bool {
        self.socket_dir.join(format!(".s.PGSQL.{SOCKET_PORT}")).exists()
    }

    fn ensure_running(&self) -> Result<(), EmbeddedError> {
        if self.is_running() {
            if self.socket_ready() {
                tracing::info!(pgdata = %self.pgdata.display(), "adopting the embedded PostgreSQL left running by a previous process");
                return Ok(());
            }
            // Running, but not where we expect it (settings changed): restart it.
            self.pg_ctl(&["stop", "-w", "-t", "60", "-m", "fast"])?;
        }
        let log = self.pgdata.join("server.log");
        let start = |this: &Self| this.pg_ctl(&["start", "-w", "-t", "120", "-l", &log.to_string_lossy()]);
        match start(self) {
            Ok(_) => Ok(()),
            Err(first) => {
                let tail = tail_of(&log, 4000);
                if tail.contains("lock file") {
                    // A stale lock from a killed cluster whose PID now belongs to someone else.
                    tracing::warn!("removing stale PostgreSQL lock files after a crash");
                    let _ = fs::remove_file(self.pgdata.join("postmaster.pid"));
                    let _ = fs::remove_file(self.socket_dir.join(format!(".s.PGSQL.{SOCKET_PORT}.lock")));
                    start(self).map(|_| ()).map_err(|e| with_log(e, &log))
                } else {
                    Err(with_log(first, &log))
                }
            }
        }
    }

    fn spawn_watchdog(&self, base: &Path) -> Result<(), EmbeddedError> {
        let quote = |p: &Path| format!("'{}'", p.to_string_lossy().replace('\'', "'\\''"));
        let script = format!(
            "cat >/dev/null; {} -D {} stop -m immediate -w >/dev/null 2>&1; rm -rf {}",
            quote(&self.binaries.tool("pg_ctl")),
            quote(&self.pgdata),
            quote(base),
        );
        // Runs as the cluster's user, which owns everything under `base`.
        let mut cmd = self.command(Path::new("/bin/sh"));
        cmd.arg("-c").arg(script);
        // Its own process group: a Ctrl-C in the terminal must not kill it before it cleans up.
        cmd.process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut child: Child = cmd
            .spawn()
            .map_err(io_err("cannot start the cleanup watchdog for", base))?;
        // The watchdog waits for EOF on this pipe, which comes when this process exits: keep
        // the write end open for the rest of the process's life.
        if let Some(stdin) = child.stdin.take() {
            std::mem::forget(stdin);
        }
        drop(child);
        Ok(())
    }
}

impl Drop for EmbeddedPostgres {
    fn drop(&mut self) {
        if let Err(error) = self.stop() {
            tracing::warn!(%error, "stopping the embedded PostgreSQL failed");
        }
    }
}

fn with_log(error: EmbeddedError, log: &Path) -> EmbeddedError {
    match error {
        EmbeddedError::Tool { tool, output } => EmbeddedError::Tool {
            tool,
            output: format!(
                "{output}\n--- server log ({}) ---\n{}",
                log.display(),
                tail_of(log, 2000)
            ),
        },
        other => other,
    }
}

fn tail_of(path: &Path, bytes: usize) -> String {
    let mut text = String::new();
    if let Ok(mut f) = File::open(path) {
        let _ = f.read_to_string(&mut text);
    }
    let start = text.len().saturating_sub(bytes);
    let start = (start..text.len())
        .find(|i| text.is_char_boundary(*i))
        .unwrap_or(text.len());
    text[start..].to_string()
}

/// Where the cluster of `data_dir` lives: in it, unless sagaflow runs as root and the
/// `postgres` user cannot get into it (e.g. under /root); then in a place that user can
/// reach, tied to this data directory.
fn cluster_home(data_dir: &Path, run_as: Option<&RunAs>) -> PathBuf {
    match run_as {
        Some(user) if !user.can_reach(data_dir) => {
            PathBuf::from("/var/lib/sagaflow").join(short_hash(&data_dir.to_string_lossy()))
        }
        _ => data_dir.to_path_buf(),
    }
}

/// The lock on `data_dir`, or `None` when another live process holds it.
fn lock_data_dir(data_dir: &Path) -> Result<Option<File>, EmbeddedError> {
    let path = data_dir.join("sagaflow.lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err("cannot open", &path))?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(fs::TryLockError::WouldBlock) => Ok(None),
        Err(fs::TryLockError::Error(e)) => Err(io_err("cannot lock", &path)(e)),
    }
}

/// A directory only the cluster's user may enter (the socket lives there: trust auth is safe).
fn prepare_private_dir(dir: &Path, run_as: Option<&RunAs>) -> Result<(), EmbeddedError> {
    fs::create_dir_all(dir).map_err(io_err("cannot create", dir))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err("cannot set permissions of", dir))?;
    if let Some(user) = run_as {
        user.chown(dir)?;
    }
    Ok(())
}

fn socket_dir_for(cluster_home: &Path) -> Result<PathBuf, EmbeddedError> {
    let preferred = cluster_home.join("run");
    if preferred.as_os_str().len() <= MAX_SOCKET_DIR_LEN {
        return Ok(preferred);
    }
    // Unix socket paths are limited to ~107 bytes; deep data directories get a short one.
    Ok(std::env::temp_dir().join(format!("sagaflow-{}", short_hash(&cluster_home.to_string_lossy()))))
}

/// A short stable hex digest (FNV-1a), for directory names derived from paths.
fn short_hash(text: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}")
}

/// The URL of `database` over the Unix socket in `socket_dir`.
fn socket_url(socket_dir: &Path, database: &str) -> String {
    format!(
        "postgres://{SUPERUSER}@localhost:{SOCKET_PORT}/{database}?host={}",
        percent_encode(&socket_dir.to_string_lossy())
    )
}

/// Percent-encodes everything but unreserved URL characters (for a socket path in a URL).
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_encoding_keeps_unreserved_characters() {
        assert_eq!(percent_encode("/tmp/a b/c-d_e.f~"), "%2Ftmp%2Fa%20b%2Fc-d_e.f~");
    }

    #[test]
    fn versioned_directories_sort_newest_first() {
        let dir = std::env::temp_dir().join(format!("sagaflow-versions-{}", std::process::id()));
        for v in ["9.6", "15", "13", "16.2", "notaversion"] {
            fs::create_dir_all(dir.join(v).join("bin")).expect("mkdir");
        }
        let found = versioned_dirs(&dir.to_string_lossy(), "", "bin");
        let names: Vec<String> = found
            .iter()
            .map(|p| {
                p.parent()
                    .and_then(|p| p.file_name())
                    .map(|n| n.to_string_lossy().to_string())
                    .unwrap_or_default()
            })
            .collect();
        assert_eq!(names, ["16.2", "15", "13", "9.6"]);
        fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn missing_binaries_are_reported_with_how_to_fix_it() {
        let error = PgBinaries::find_in(&[PathBuf::from("/nonexistent/bin")]).expect_err("nothing found");
        let message = error.to_string();
        assert!(message.contains("/nonexistent/bin"), "{message}");
        assert!(
            message.contains("apt-get install postgresql") && message.contains("DATABASE_URL"),
            "{message}"
        );
    }

    #[test]
    fn deep_data_directories_get_a_short_socket_directory() {
        let deep = PathBuf::from("/").join("x".repeat(120));
        let dir = socket_dir_for(&deep).expect("socket dir");
        assert!(dir.as_os_str().len() <= MAX_SOCKET_DIR_LEN, "{}", dir.display());
        assert_eq!(
            socket_dir_for(Path::new("/data")).expect("socket dir"),
            PathBuf::from("/data/run")
        );
    }
}
