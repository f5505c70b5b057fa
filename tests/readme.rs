//! The README, followed as a new user follows it: every `sh` block, in order, in one shell,
//! against the real binary on the embedded PostgreSQL default; then all of it again on the
//! same data directory. A block's `cargo run --release` starts the binary this test built
//! (with the same environment), `localhost:3000` becomes the port it listens on, and a
//! ```` ```text ```` block right below a `sh` block is what that block must print, line by
//! line (`...` stands for anything: ids, times). A block preceded by
//! `<!-- readme-test: skip, why -->` is not run.
//!
//! Needs `curl`, `jq`, `openssl` and `python3` (the walkthrough's tools). Without them the
//! test fails when `SAGAFLOW_REQUIRE_README=1` (as `.ci/run` sets) and otherwise says loudly
//! that it did not run, so that `cargo test` stays true on a machine with only Rust and
//! PostgreSQL.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

const README: &str = include_str!("../README.md");
const TOOLS: [&str; 4] = ["curl", "jq", "openssl", "python3"];

/// One fenced `sh` block of the README.
#[derive(Debug)]
struct Block {
    /// Its first line's number in the README (from 1).
    line: usize,
    text: String,
    /// What it must print, and where that is written.
    expected: Option<(usize, String)>,
    /// Why it is not run, when it is not.
    skip: Option<String>,
}

impl Block {
    /// Whether it starts (or restarts) the server: its output is the server's and the
    /// participant's, not the block's.
    fn starts_a_server(&self) -> bool {
        self.text.contains("cargo run --release")
    }
}

fn blocks(readme: &str) -> Vec<Block> {
    let lines: Vec<&str> = readme.lines().collect();
    let mut blocks: Vec<Block> = Vec::new();
    let mut i = 0;
    // Whether the last fence closed was a `sh` block still waiting for its expected output.
    let mut open_for_output = false;
    while i < lines.len() {
        let line = lines[i];
        let Some(info) = line.strip_prefix("```") else {
            i += 1;
            continue;
        };
        let start = i + 1;
        let mut end = start;
        while end < lines.len() && lines[end] != "```" {
            end += 1;
        }
        assert!(end < lines.len(), "README line {start}: a block that never closes");
        let body = lines[start..end].join("\n") + "\n";
        match info.trim() {
            "sh" => {
                let skip = lines[..i]
                    .iter()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .and_then(|l| l.trim().strip_prefix("<!-- readme-test: skip, "))
                    .and_then(|l| l.strip_suffix(" -->"))
                    .map(str::to_string);
                blocks.push(Block {
                    line: start + 1,
                    text: body,
                    expected: None,
                    skip,
                });
                open_for_output = true;
            }
            "text" => {
                let block = blocks
                    .last_mut()
                    .filter(|_| open_for_output)
                    .unwrap_or_else(|| panic!("README line {start}: a text block with no sh block above it"));
                block.expected = Some((start + 1, body));
                open_for_output = false;
            }
            _ => open_for_output = false,
        }
        i = end + 1;
    }
    blocks
}

/// Whether `line` matches `pattern`, where `...` stands for any text.
fn matches(pattern: &str, line: &str) -> bool {
    let parts: Vec<&str> = pattern.split("...").collect();
    if parts.len() == 1 {
        return pattern == line;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !line.starts_with(first) || line.len() < first.len() + last.len() || !line.ends_with(last) {
        return false;
    }
    let mut rest = &line[first.len()..line.len() - last.len()];
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    true
}

const MARKER: &str = "@@readme-block ";

/// The script the blocks make: a prelude that can start and stop the server, then each block
/// after a marker line, so that what each printed can be told apart.
fn script(blocks: &[Block], port: u16) -> String {
    let mut script = format!(
        r#"set -euo pipefail
PORT={port}
SERVER=
# `cargo run --release` in a block: (re)start the server this test built, in the background.
sagaflow_serve() {{
    sagaflow_stop
    "$SAGAFLOW_BIN" --listen 127.0.0.1:$PORT >> server.log 2>&1 &
    SERVER=$!
    for _ in $(seq 600); do
        curl -fsS -o /dev/null 127.0.0.1:$PORT/healthz 2>/dev/null && return 0
        kill -0 $SERVER 2>/dev/null || {{ echo "the server exited" >&2; return 1; }}
        sleep 0.1
    done
    echo "the server did not become healthy" >&2; return 1
}}
sagaflow_stop() {{
    if [ -n "$SERVER" ]; then kill -TERM $SERVER; wait $SERVER || true; SERVER=; fi
}}
trap sagaflow_stop EXIT
"#
    );
    for (index, block) in blocks.iter().enumerate() {
        if block.skip.is_some() {
            continue;
        }
        let text = block
            .text
            .replace("cargo run --release", "sagaflow_serve")
            .replace("localhost:3000", &format!("127.0.0.1:{port}"))
            .replace("127.0.0.1:3000", &format!("127.0.0.1:{port}"));
        script.push_str(&format!("echo '{MARKER}{index}@@'\n"));
        if block.starts_a_server() {
            // What it prints is the server's and the participant's: to the server log.
            script.push_str(&format!("{{\n{text}}} >> server.log 2>&1\n"));
        } else {
            script.push_str(&text);
        }
    }
    script.push_str(&format!("echo '{MARKER}end@@'\n"));
    script
}

/// What each block printed, by block index.
fn outputs(stdout: &str) -> Vec<(usize, Vec<String>)> {
    let mut outputs: Vec<(usize, Vec<String>)> = Vec::new();
    for line in stdout.lines() {
        if let Some(index) = line.strip_prefix(MARKER).and_then(|l| l.strip_suffix("@@")) {
            if let Ok(index) = index.parse() {
                outputs.push((index, Vec::new()));
            }
        } else if let Some((_, lines)) = outputs.last_mut() {
            lines.push(line.to_string());
        }
    }
    outputs
}

fn tools_missing() -> Vec<&'static str> {
    TOOLS
        .into_iter()
        .filter(|tool| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .collect()
}

struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn scratch() -> Scratch {
    let dir = std::env::temp_dir().join(format!("sagaflow-readme-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    // The embedded cluster may run as the postgres user (tests as root): let it in.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    // The blocks name files of the repository by relative paths, as from a clone.
    std::os::unix::fs::symlink(concat!(env!("CARGO_MANIFEST_DIR"), "/examples"), dir.join("examples"))
        .expect("link examples");
    Scratch(dir)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Runs the script in `dir` once, as its own process group (the blocks start background
/// processes: the participant); returns what it printed and whether it succeeded.
fn follow(dir: &Path, script_text: &str, pass: usize) -> (bool, String) {
    let script_path = dir.join(format!("readme-{pass}.sh"));
    std::fs::write(&script_path, script_text).expect("write script");
    let out_path = dir.join(format!("readme-{pass}.out"));
    let out = File::create(&out_path).expect("output file");
    let err = out.try_clone().expect("clone output");
    let mut child = Command::new("bash")
        .arg(&script_path)
        .current_dir(dir)
        .env("SAGAFLOW_BIN", env!("CARGO_BIN_EXE_sagaflow"))
        .env_remove("DATABASE_URL")
        .env_remove("SAGAFLOW_API_TOKEN")
        .env_remove("SAGAFLOW_ADMIN_TOKEN")
        // Files, not pipes: a background process holding a pipe open would keep us waiting.
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .expect("bash");
    let group = Pid::from_raw(child.id() as i32);
    let deadline = Instant::now() + Duration::from_secs(240);
    let succeeded = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break status.success();
        }
        if Instant::now() > deadline {
            let _ = killpg(group, Signal::SIGKILL);
            let _ = child.wait();
            break false;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // The participant the blocks started in the background.
    let _ = killpg(group, Signal::SIGTERM);
    (succeeded, std::fs::read_to_string(&out_path).unwrap_or_default())
}

fn server_log(dir: &Path) -> String {
    let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
    let mut start = log.len().saturating_sub(6000);
    while !log.is_char_boundary(start) {
        start += 1;
    }
    log[start..].to_string()
}

#[test]
fn the_readme_can_be_followed_top_to_bottom_twice_on_the_same_data() {
    let missing = tools_missing();
    if !missing.is_empty() {
        let required = std::env::var("SAGAFLOW_REQUIRE_README").is_ok_and(|v| v == "1");
        assert!(!required, "missing {missing:?} and SAGAFLOW_REQUIRE_README=1");
        eprintln!("\n*** WARNING: the README test did NOT run: {missing:?} not found on this machine. ***\n");
        return;
    }
    let blocks = blocks(README);
    let run: Vec<&Block> = blocks.iter().filter(|b| b.skip.is_none()).collect();
    assert!(run.len() >= 8, "only {} blocks to run: {blocks:#?}", run.len());
    assert!(
        run.iter().filter(|b| b.expected.is_some()).count() >= 5,
        "too few blocks say what they print"
    );
    // The order saga's participant listens where its definition says, as in the README.
    assert!(
        std::net::TcpListener::bind(("127.0.0.1", 4000)).is_ok(),
        "port 4000, which the README's participant uses (examples/order-saga/order.json), is taken"
    );
    let dir = scratch();
    let script_text = script(&blocks, free_port());
    for pass in 1..=2 {
        let (succeeded, stdout) = follow(&dir.0, &script_text, pass);
        let context = || {
            format!(
                "pass {pass}; it printed:\n{stdout}\n--- server log (end):\n{}",
                server_log(&dir.0)
            )
        };
        assert!(succeeded, "the README's blocks failed, {}", context());
        let outputs = outputs(&stdout);
        assert!(
            stdout.contains(&format!("{MARKER}end@@")),
            "the script stopped early, {}",
            context()
        );
        for (index, printed) in &outputs {
            let block = &blocks[*index];
            let Some((line, expected)) = &block.expected else {
                continue;
            };
            let expected: Vec<&str> = expected.lines().collect();
            assert_eq!(
                printed.len(),
                expected.len(),
                "the sh block at README line {} printed {} lines, the text block at line {line} says {}: {}",
                block.line,
                printed.len(),
                expected.len(),
                context()
            );
            for (want, got) in expected.iter().zip(printed) {
                assert!(
                    matches(want, got),
                    "the sh block at README line {}: expected (line {line})\n  {want}\ngot\n  {got}\n{}",
                    block.line,
                    context()
                );
            }
        }
        // Every block that says what it prints was run and checked.
        for (index, block) in blocks.iter().enumerate() {
            if block.skip.is_none() && block.expected.is_some() {
                assert!(
                    outputs.iter().any(|(i, _)| *i == index),
                    "the block at README line {} never ran, {}",
                    block.line,
                    context()
                );
            }
        }
    }
}

#[test]
fn expected_output_patterns_match_only_what_they_say() {
    assert!(matches("200 completed", "200 completed"));
    assert!(!matches("200 completed", "201 completed"));
    assert!(matches("authid_...", "authid_01ABC"));
    assert!(!matches("authid_...", "cus_01ABC"));
    assert!(matches(
        r#"{"id":"cus_...","email":"ada...@example.com"}"#,
        r#"{"id":"cus_1","email":"ada.17@example.com"}"#
    ));
    assert!(!matches("a...b...c", "a-c-b"));
    assert!(!matches("ab...ba", "aba"));
    let found = blocks(
        "text\n<!-- readme-test: skip, slow -->\n```sh\nslow\n```\n\n```sh\necho hi\n```\n\nIt prints:\n\n```text\nhi\n```\n```json\n{}\n```\n",
    );
    assert_eq!(found.len(), 2);
    assert_eq!(found[0].skip.as_deref(), Some("slow"));
    assert!(found[0].expected.is_none());
    assert_eq!(found[1].expected.as_ref().map(|(_, t)| t.as_str()), Some("hi\n"));
}
