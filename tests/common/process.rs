//! The real `sagaflow` binary as a child process, for crash tests: start it, SIGKILL it,
//! SIGSTOP/SIGCONT it, SIGTERM it, restart it on the same database.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, ChildStderr, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::server::{ADMIN_TOKEN, API_TOKEN};

/// How to start a server process.
#[derive(Debug, Clone)]
pub struct Options {
    /// `--node-id`.
    pub node: String,
    /// `SAGAFLOW_FAULTS`.
    pub faults: Option<String>,
    /// `--lease-ttl`.
    pub lease_ttl: Duration,
    /// `--shutdown-grace`.
    pub shutdown_grace: Duration,
    /// The port to listen on (0: pick a free one).
    pub port: u16,
    /// More environment variables for the process.
    pub env: Vec<(String, String)>,
    /// Send stderr to a pipe that nobody reads (instead of the log file), as a supervisor
    /// that stopped reading would.
    pub stderr_unread: bool,
}

impl Options {
    pub fn node(node: &str) -> Self {
        Self {
            node: node.to_string(),
            faults: None,
            lease_ttl: Duration::from_secs(2),
            shutdown_grace: Duration::from_secs(5),
            port: 0,
            env: Vec::new(),
            stderr_unread: false,
        }
    }
}

/// A running server process.
pub struct ServerProcess {
    child: Option<Child>,
    /// The read end of an unread stderr pipe, held open so the pipe fills instead of breaking.
    _stderr: Option<ChildStderr>,
    pub port: u16,
    pub options: Options,
    pub log: PathBuf,
    database_url: String,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

impl ServerProcess {
    /// Starts the binary on `database_url` and waits until it answers /healthz. Returns it
    /// even if it aborts right away (a fault may strike at once); see [`Self::wait_exit`].
    pub async fn start(database_url: &str, mut options: Options) -> Self {
        if options.port == 0 {
            options.port = free_port();
        }
        let log = std::env::temp_dir().join(format!(
            "sagaflow-{}-{}-{}.log",
            std::process::id(),
            options.node,
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        let mut server = Self {
            child: None,
            _stderr: None,
            port: options.port,
            options,
            log,
            database_url: database_url.to_string(),
        };
        server.spawn().await;
        server
    }

    async fn spawn(&mut self) {
        let log = std::fs::File::create(&self.log).expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sagaflow"));
        cmd.arg("serve")
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--node-id")
            .arg(&self.options.node)
            .arg("--lease-ttl")
            .arg(format!("{}ms", self.options.lease_ttl.as_millis()))
            .arg("--shutdown-grace")
            .arg(format!("{}ms", self.options.shutdown_grace.as_millis()))
            .arg("--poll-interval")
            .arg("500ms")
            .env("DATABASE_URL", &self.database_url)
            .env("SAGAFLOW_API_TOKEN", API_TOKEN)
            .env("SAGAFLOW_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("RUST_LOG", "info,sqlx=warn")
            .env_remove("SAGAFLOW_FAULTS")
            .stdout(Stdio::null());
        if self.options.stderr_unread {
            cmd.stderr(Stdio::piped());
        } else {
            cmd.stderr(log);
        }
        if let Some(faults) = &self.options.faults {
            cmd.env("SAGAFLOW_FAULTS", faults);
        }
        cmd.envs(self.options.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let mut child = cmd.spawn().expect("spawn sagaflow");
        self._stderr = child.stderr.take();
        self.child = Some(child);
        self.wait_ready().await;
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if healthy(self.port).await {
                return;
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(_)) = child.try_wait()
            {
                return; // died at once (an injected fault); the test looks at it
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "server {} not healthy after 60 s; log:\n{}",
            self.options.node,
            self.log_text()
        );
    }

    /// The read end of the stderr pipe of a server started with `stderr_unread`, for a test
    /// that looks at what piled up in it (hold it open: dropping it breaks the pipe).
    pub fn take_unread_stderr(&mut self) -> Option<ChildStderr> {
        self._stderr.take()
    }

    /// The base URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn pid(&self) -> Option<Pid> {
        self.child.as_ref().map(|c| Pid::from_raw(c.id() as i32))
    }

    /// Waits for the process to exit by itself (e.g. aborted by a fault).
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().expect("running");
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "server {} did not exit; log:\n{}",
                self.options.node,
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL, and reap it.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP: the process freezes, its sessions stay open.
    pub fn pause(&self) {
        if let Some(pid) = self.pid() {
            kill(pid, Signal::SIGSTOP).expect("SIGSTOP");
        }
    }

    /// SIGCONT.
    pub fn resume(&self) {
        if let Some(pid) = self.pid() {
            kill(pid, Signal::SIGCONT).expect("SIGCONT");
        }
    }

    /// SIGTERM, then waits for the exit status.
    pub async fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        if let Some(pid) = self.pid() {
            kill(pid, Signal::SIGTERM).expect("SIGTERM");
        }
        self.wait_exit(timeout).await
    }

    /// Starts the binary again with new options (same port unless they say otherwise).
    pub async fn restart(&mut self, options: Options) {
        self.kill9();
        let port = self.port;
        self.options = options;
        if self.options.port == 0 {
            self.options.port = port;
        }
        self.port = self.options.port;
        self.spawn().await;
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn log_text(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut text);
        }
        text
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Some(pid) = self.pid() {
            let _ = kill(pid, Signal::SIGCONT);
        }
        self.kill9();
        let _ = std::fs::remove_file(&self.log);
    }
}

async fn healthy(port: u16) -> bool {
    let client = reqwest::Client::new();
    let answer = client
        .get(format!("http://127.0.0.1:{port}/healthz"))
        .timeout(Duration::from_secs(2))
        .send()
        .await;
    answer.is_ok_and(|r| r.status() == reqwest::StatusCode::OK)
}
