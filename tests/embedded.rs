//! The embedded PostgreSQL default and the server's life cycle, through the real binary:
//! first start (initdb), restart (data persists), SIGKILL then restart (the orphaned cluster
//! is adopted), a stale `postmaster.pid`, SIGTERM (exit 0, database stopped), no binaries.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("sagaflow-{tag}-{}-{}", std::process::id(), rand_suffix()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        // The cluster may run as another user (when tests run as root): let it in.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // Stop any cluster a failed test left behind, then remove the directory.
        if let Some(pid) = postmaster(&self.0.join("data")) {
            let _ = kill(pid, Signal::SIGQUIT);
            std::thread::sleep(Duration::from_millis(500));
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// The PID of the cluster's postmaster, if one is running. (Not `pg_ctl status`: it refuses
/// to run as root, and the tests may.)
fn postmaster(data_dir: &Path) -> Option<Pid> {
    let text = std::fs::read_to_string(data_dir.join("pgdata").join("postmaster.pid")).ok()?;
    let pid = Pid::from_raw(text.lines().next()?.trim().parse().ok()?);
    kill(pid, None).ok().map(|()| pid)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn spawn_server(data_dir: &Path, port: u16) -> Child {
    Command::new(env!("CARGO_BIN_EXE_sagaflow"))
        .arg("serve")
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--data-dir")
        .arg(data_dir)
        .env_remove("DATABASE_URL")
        .env_remove("SAGAFLOW_FAULTS")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sagaflow")
}

fn healthy(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.starts_with("HTTP/1.1 200") && response.contains("\"ok\"")
}

/// The status code of `GET path` with `token` as the bearer.
fn status_with_token(port: u16, path: &str, token: &str) -> u16 {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).expect("send");
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status in {response}"))
}

fn wait_healthy(child: &mut Child, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if healthy(port) {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            if let Some(mut stderr) = child.stderr.take() {
                use std::io::Read;
                let _ = stderr.read_to_string(&mut err);
            }
            panic!("server exited with {status}: {err}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("server not healthy after 60 s");
}

fn terminate(mut child: Child) -> std::process::ExitStatus {
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("SIGTERM");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        assert!(Instant::now() < deadline, "server did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn cluster_running(data_dir: &Path) -> bool {
    postmaster(data_dir).is_some()
}

fn psql_scalar(data_dir: &Path, sql: &str) -> String {
    let url = format!(
        "postgres://postgres@localhost:5432/sagaflow?host={}",
        data_dir.join("run").display().to_string().replace('/', "%2F")
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&url)
            .await
            .expect("connect to the embedded cluster");
        let value: String = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
            .fetch_one(&mut conn)
            .await
            .expect("query");
        value
    })
}

#[test]
fn the_embedded_default_starts_persists_survives_a_kill_and_stops_on_sigterm() {
    let tmp = TempDir::new("embedded");
    let data = tmp.0.join("data");
    let port = free_port();

    // First start: initdb, migrations, healthz.
    let mut server = spawn_server(&data, port);
    wait_healthy(&mut server, port);
    assert!(data.join("pgdata").join("PG_VERSION").is_file());
    let first_worker = psql_scalar(&data, "SELECT max(id)::text FROM workers");
    // SIGTERM: exit 0, database stopped.
    let status = terminate(server);
    assert!(status.success(), "exit status {status}");
    assert!(!cluster_running(&data), "the embedded cluster was left running");

    // No token was configured: both were generated and kept in the data directory, readable
    // by its owner only.
    let tokens = || {
        ["api-token", "admin-token"].map(|file| {
            let path = data.join(file);
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("token file").permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{file}");
            std::fs::read_to_string(&path).expect("token").trim().to_string()
        })
    };
    let first_tokens = tokens();
    assert!(first_tokens.iter().all(|t| t.len() == 64), "{first_tokens:?}");
    assert_ne!(first_tokens[0], first_tokens[1]);

    // Restart: the same cluster, data kept, and the same tokens, which the API accepts.
    let mut server = spawn_server(&data, port);
    wait_healthy(&mut server, port);
    let workers = psql_scalar(&data, "SELECT count(*)::text FROM workers");
    assert_eq!(workers, "2", "the first start's worker row is still there");
    assert_eq!(tokens(), first_tokens, "a restart keeps the generated tokens");
    assert_eq!(status_with_token(port, "/v1/runs", &first_tokens[0]), 200);
    assert_eq!(status_with_token(port, "/v1/runs", "not-the-token"), 401);

    // SIGKILL leaves the cluster running; the next start adopts it.
    server.kill().expect("SIGKILL");
    let _ = server.wait();
    assert!(cluster_running(&data), "PostgreSQL outlives a killed server");
    let mut server = spawn_server(&data, port);
    wait_healthy(&mut server, port);
    let stopped: String = psql_scalar(
        &data,
        &format!("SELECT count(*)::text FROM workers WHERE stopped_at IS NOT NULL AND id > {first_worker}"),
    );
    assert_eq!(
        stopped, "1",
        "the killed incarnation is recognised as gone when its node restarts"
    );
    let status = terminate(server);
    assert!(status.success(), "exit status {status}");
    assert!(!cluster_running(&data));

    // A stale postmaster.pid (a crashed cluster whose PID is gone) does not stop a start.
    std::fs::write(data.join("pgdata").join("postmaster.pid"), "999999\n").expect("stale pid file");
    let mut server = spawn_server(&data, port);
    wait_healthy(&mut server, port);
    let status = terminate(server);
    assert!(status.success(), "exit status {status}");
}

/// A SIGTERM that arrives while the server starts (here: while it creates its cluster) is
/// heard: the server finishes starting, then stops as on any SIGTERM, exit 0 and its cluster
/// stopped, instead of being killed by the signal's default action mid-start.
#[test]
fn a_sigterm_while_the_server_starts_stops_it_once_started() {
    let tmp = TempDir::new("early-term");
    let data = tmp.0.join("data");
    let port = free_port();
    let mut server = spawn_server(&data, port);
    // The tokens are written before the cluster is created, after the signals are listened for.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !data.join("api-token").is_file() {
        assert!(
            server.try_wait().expect("wait").is_none(),
            "the server exited before starting"
        );
        assert!(Instant::now() < deadline, "no token file after 30 s");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        !healthy(port),
        "the server was already serving: the signal would not arrive while it starts"
    );
    let status = terminate(server);
    assert!(status.success(), "exit status {status}");
    assert!(
        data.join("pgdata").join("PG_VERSION").is_file(),
        "the start went on to create the cluster"
    );
    assert!(!cluster_running(&data), "the embedded cluster was left running");
}

/// `sagaflow` with `args`, as the user would type it (no `DATABASE_URL` from the test's env).
fn sagaflow(args: &[&str], data: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sagaflow"))
        .args(args)
        .arg("--data-dir")
        .arg(data)
        .env_remove("DATABASE_URL")
        .output()
        .expect("run sagaflow")
}

#[test]
fn a_second_server_on_a_data_directory_is_refused_and_check_and_migrate_use_the_running_one() {
    let tmp = TempDir::new("shared");
    let data = tmp.0.join("data");
    let (p1, p2) = (free_port(), free_port());
    let mut first = spawn_server(&data, p1);
    wait_healthy(&mut first, p1);

    let second = sagaflow(&["--listen", &format!("127.0.0.1:{p2}")], &data);
    assert!(!second.status.success());
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("in use by another sagaflow process"), "{err}");
    // It names the URL that reaches the running cluster, and that URL works.
    let url = err
        .split("DATABASE_URL='")
        .nth(1)
        .and_then(|rest| rest.split('\'').next())
        .unwrap_or_else(|| panic!("no DATABASE_URL in: {err}"));
    let by_url = Command::new(env!("CARGO_BIN_EXE_sagaflow"))
        .args(["check", "--database-url", url])
        .output()
        .expect("check by url");
    assert!(by_url.status.success(), "{}", String::from_utf8_lossy(&by_url.stderr));

    // Beside the running server, check and migrate use its cluster and leave it running.
    for command in ["check", "migrate"] {
        let out = sagaflow(&[command], &data);
        assert!(
            out.status.success(),
            "{command}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let checked = sagaflow(&["check"], &data);
    assert!(String::from_utf8_lossy(&checked.stdout).contains("all invariants hold"));
    wait_healthy(&mut first, p1);
    assert!(terminate(first).success());

    // With the server gone, check starts (and stops) the cluster itself, as before.
    let alone = sagaflow(&["check"], &data);
    assert!(alone.status.success(), "{}", String::from_utf8_lossy(&alone.stderr));
    assert!(postmaster(&data).is_none(), "check left the cluster it started running");
}

/// Starts the server on `data` as `configure` says, expects it to refuse (exit 1), and
/// returns what it wrote on stderr.
fn refused_start(data: &Path, configure: impl FnOnce(&mut Command)) -> String {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sagaflow"));
    command.args(["--listen", "127.0.0.1:0", "--data-dir"]).arg(data);
    configure(&mut command);
    let out = command.output().expect("run");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{err}");
    err
}

#[test]
fn without_postgres_binaries_the_server_says_how_to_get_them() {
    let tmp = TempDir::new("nobin");
    let err = refused_start(&tmp.0.join("data"), |command| {
        command
            .env_remove("DATABASE_URL")
            .env("SAGAFLOW_PG_BINDIR", tmp.0.join("no-such-bin"));
    });
    assert!(
        err.contains("no PostgreSQL server binaries") && err.contains("DATABASE_URL"),
        "{err}"
    );
}

#[test]
fn a_kept_token_file_that_holds_no_token_is_refused_with_its_path() {
    let tmp = TempDir::new("badtoken");
    let data = tmp.0.join("data");
    std::fs::create_dir_all(&data).expect("data dir");
    std::fs::write(data.join("admin-token"), "short\n").expect("token file");
    let err = refused_start(&data, |command| {
        command
            .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
            .env_remove("SAGAFLOW_API_TOKEN")
            .env_remove("SAGAFLOW_ADMIN_TOKEN");
    });
    assert!(
        err.contains("admin-token holds no valid token") && err.contains("SAGAFLOW_ADMIN_TOKEN"),
        "{err}"
    );
    // Nothing was written: both kept files are read before a missing one is generated.
    assert_eq!(
        std::fs::read_to_string(data.join("admin-token")).expect("kept"),
        "short\n"
    );
    assert!(
        !data.join("api-token").exists(),
        "the API token was generated all the same"
    );
}

#[test]
fn bad_fault_specs_are_refused_at_start() {
    let tmp = TempDir::new("faults");
    let err = refused_start(&tmp.0.join("data"), |command| {
        command
            .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
            .env("SAGAFLOW_FAULTS", "explode:everything")
            // A configuration mistake is one line to fix, not a backtrace, even with this set.
            .env("RUST_BACKTRACE", "1");
    });
    assert!(
        err.contains("error: ") && err.contains("invalid SAGAFLOW_FAULTS entry `explode:everything`"),
        "{err}"
    );
    assert!(!err.to_lowercase().contains("backtrace"), "{err}");
}

#[test]
fn logs_are_json_lines_with_a_flag() {
    let tmp = TempDir::new("jsonlog");
    let out = Command::new(env!("CARGO_BIN_EXE_sagaflow"))
        .args(["--listen", "127.0.0.1:0", "--log-format", "json", "--data-dir"])
        .arg(tmp.0.join("data"))
        // A valid fault spec makes the server warn before it fails to reach this database.
        .env("SAGAFLOW_FAULTS", "fail:nothing")
        .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none?connect_timeout=1")
        .env("RUST_LOG", "info")
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    let warning = err
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|v| {
            v["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("SAGAFLOW_FAULTS"))
        })
        .unwrap_or_else(|| panic!("no JSON log line about the faults in: {err}"));
    assert_eq!(warning["level"], "WARN");
    assert!(!out.status.success(), "the unreachable database is an error");
}
