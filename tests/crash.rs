//! Crash recovery against the real binary and a real PostgreSQL: abort at every point of
//! every step, SIGKILL at random under load, several instances, a paused owner, a database
//! restart, SIGTERM. Every test ends with the invariant checker (docs/contract.md §6).
//!
//! `SAGAFLOW_CHAOS=1` turns on the long chaos mode (thousands of runs, dozens of kills,
//! several instances); `SAGAFLOW_CHAOS_SEED` replays a seed.

mod common;

use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::process::{Options, ServerProcess};
use common::server::API_TOKEN;
use common::{TestDb, eventually, test_db};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sagaflow::engine::Faults;
use serde_json::{Value, json};
use sqlx::PgPool;

const WORKFLOW: &str = "create-customer-account";
const STEPS: [&str; 5] = [
    "validate-customer-account-creation",
    "create-customers",
    "customers-created",
    "emit-customer-created",
    "set-auth-app-metadata",
];

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

/// Creates an auth identity over HTTP.
async fn identity(client: &reqwest::Client, base: &str, email: &str) -> String {
    let body: Value = client
        .post(format!("{base}/v1/auth-identities"))
        .bearer_auth(API_TOKEN)
        .json(&json!({"provider": "emailpass", "entity_id": email}))
        .send()
        .await
        .expect("identity")
        .json()
        .await
        .expect("json");
    body["id"].as_str().expect("id").to_string()
}

fn registration(identity: &str, email: &str) -> Value {
    json!({"authIdentityId": identity, "customerData": {"email": email, "first_name": "Crash", "last_name": "Test"}})
}

/// Triggers a registration; `Ok(run id)` once accepted, `Err` when the server is not there.
async fn trigger(client: &reqwest::Client, base: &str, key: &str, body: &Value) -> Result<String, String> {
    let run = trigger_run(client, base, key, body, 0).await?;
    Ok(run["id"].as_str().unwrap_or_default().to_string())
}

/// Triggers a registration waiting `wait_ms` for it; `Ok(the run)` once answered, `Err` when
/// the server is not there or refuses.
async fn trigger_run(
    client: &reqwest::Client,
    base: &str,
    key: &str,
    body: &Value,
    wait_ms: u32,
) -> Result<Value, String> {
    let response = client
        .post(format!("{base}/v1/workflows/{WORKFLOW}/runs?wait_ms={wait_ms}"))
        .bearer_auth(API_TOKEN)
        .header("Idempotency-Key", key)
        .json(body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    let body: Value = response.json().await.map_err(|e| e.to_string())?;
    if status.is_success() {
        Ok(body)
    } else {
        Err(format!("{status}: {body}"))
    }
}

async fn run_id_by_key(pool: &PgPool, key: &str) -> Option<uuid::Uuid> {
    sqlx::query_scalar("SELECT id FROM runs WHERE idempotency_key = $1")
        .bind(key)
        .fetch_optional(pool)
        .await
        .expect("query")
}

/// Waits until no run is left unfinished.
async fn all_terminal(pool: &PgPool, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let unfinished = sagaflow::check::unfinished_runs(pool).await.expect("query");
        if unfinished.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} runs never finished, e.g. {:?}",
            unfinished.len(),
            &unfinished[..unfinished.len().min(5)]
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every invariant of docs/contract.md §6 holds.
async fn assert_invariants(pool: &PgPool) {
    let engine = sagaflow::server::build_engine(pool.clone(), Default::default(), Faults::none(), &Default::default())
        .expect("engine");
    let violations = sagaflow::check::violations(pool, &engine).await.expect("check");
    assert!(
        violations.is_empty(),
        "invariants broken:\n{}",
        violations.iter().map(|v| format!("  {v}\n")).collect::<String>()
    );
}

async fn log_of(pool: &PgPool, run: uuid::Uuid) -> Vec<(String, Option<String>, Option<i32>, Value)> {
    sqlx::query_as("SELECT kind::text, step, attempt, detail FROM run_events WHERE run_id = $1 ORDER BY seq")
        .bind(run)
        .fetch_all(pool)
        .await
        .expect("log")
}

async fn steps_of(pool: &PgPool, run: uuid::Uuid) -> Vec<(String, String, i32, i32, i32)> {
    sqlx::query_as(
        "SELECT name, status::text, attempts, compensation_attempts, lost_attempts + lost_compensation_attempts
         FROM run_steps WHERE run_id = $1 ORDER BY idx",
    )
    .bind(run)
    .fetch_all(pool)
    .await
    .expect("steps")
}

/// What the run should look like after the crash and the restart.
struct Expected {
    status: &'static str,
    /// Invoke attempts per step, in plan order.
    attempts: [i32; 5],
    /// Compensation attempts of create-customers.
    create_compensations: i32,
}

/// How the server records a run's local steps.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Recording {
    /// Each attempt commits on its own (`--no-fusion`).
    PerAttempt,
    /// Consecutive local steps commit together (the default).
    Fused,
}

impl Recording {
    fn options(self, node: &str) -> Options {
        let mut options = Options::node(node);
        if self == Recording::PerAttempt {
            options.env.push(("SAGAFLOW_NO_FUSION".into(), "true".into()));
        }
        options
    }
}

/// Aborts the server at `faults`, restarts it without faults (recording the same way), and
/// checks the run's final state exactly.
async fn crash_at(faults: &str, recording: Recording, expected: Expected) {
    let db = test_db().await;
    let node = "crash-node";
    let mut server = ServerProcess::start(
        &db.url,
        Options {
            faults: Some(faults.to_string()),
            ..recording.options(node)
        },
    )
    .await;
    let client = client();
    let email = "crash@example.com";
    let auth = identity(&client, &server.url(), email).await;
    // The process may die before it answers: the idempotency key finds the run afterwards.
    let _ = trigger(&client, &server.url(), "crash-run", &registration(&auth, email)).await;
    let status = server.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(
        status.signal(),
        Some(6),
        "the fault {faults} did not abort the process (status {status})"
    );
    let run = run_id_by_key(&db.pool, "crash-run")
        .await
        .expect("the run was accepted before the crash");

    server.restart(recording.options(node)).await;
    all_terminal(&db.pool, Duration::from_secs(30)).await;
    let final_status: String = sqlx::query_scalar("SELECT status::text FROM runs WHERE id = $1")
        .bind(run)
        .fetch_one(&db.pool)
        .await
        .expect("run");
    let steps = steps_of(&db.pool, run).await;
    let log = log_of(&db.pool, run).await;
    let context = format!(
        "{faults}: steps {steps:?}\nlog {:#?}",
        log.iter().map(|e| (&e.0, &e.1, e.2)).collect::<Vec<_>>()
    );
    assert_eq!(final_status, expected.status, "{context}");
    let attempts: Vec<i32> = steps.iter().map(|s| s.2).collect();
    assert_eq!(attempts, expected.attempts, "{context}");
    assert_eq!(steps[1].3, expected.create_compensations, "{context}");
    // Exactly the attempt the crash interrupted is recorded as lost (not charged to the budget).
    let lost: i32 = steps.iter().map(|s| s.4).sum();
    let interrupted = expected.attempts.iter().any(|a| *a > 1) && expected.create_compensations == 0
        || expected.create_compensations > 1;
    assert_eq!(lost, i32::from(interrupted), "{context}");

    // The domain: exactly the customer a completed run made, or none.
    let (customers, linked) = registered(&db.pool, email, &auth).await;
    let released: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_events WHERE status = 'released'")
        .fetch_one(&db.pool)
        .await
        .expect("count");
    if expected.status == "completed" {
        assert_eq!((customers, released), (1, 1), "{context}");
        assert!(linked.is_some_and(|id| id.starts_with("cus_")), "{context}");
    } else {
        assert_eq!((customers, released, linked), (0, 0, None), "{context}");
    }
    // A crash before the outcome committed shows in the log as a takeover and a lost attempt.
    if expected.attempts.iter().any(|a| *a > 1) || expected.create_compensations > 1 {
        assert!(log.iter().any(|e| e.0 == "lease_taken_over"), "{context}");
        assert!(
            log.iter()
                .any(|e| e.3["error"].as_str().is_some_and(|m| m.starts_with("attempt lost"))),
            "{context}"
        );
    }
    assert_invariants(&db.pool).await;
    server.kill9();
}

/// What the domain holds of a registration: how many customers have the email, and the
/// customer the identity is linked to.
async fn registered(pool: &PgPool, email: &str, identity: &str) -> (i64, Option<String>) {
    let customers: i64 = sqlx::query_scalar("SELECT count(*) FROM customers WHERE email = $1")
        .bind(email)
        .fetch_one(pool)
        .await
        .expect("count");
    let linked: Option<String> =
        sqlx::query_scalar("SELECT app_metadata->>'customer_id' FROM auth_identities WHERE id = $1")
            .bind(identity)
            .fetch_one(pool)
            .await
            .expect("identity");
    (customers, linked)
}

const ALL_ONCE: [i32; 5] = [1, 1, 1, 1, 1];

/// The attempts after a crash before the attempt of step `i` committed: that attempt is lost
/// and retried once.
fn retried(i: usize) -> [i32; 5] {
    let mut attempts = ALL_ONCE;
    attempts[i] = 2;
    attempts
}

macro_rules! crash_points {
    ($recording:expr; $($name:ident: $step:expr => $point:literal, $expected:expr;)*) => {$(
        #[tokio::test]
        async fn $name() {
            crash_at(&format!("{}:{}", $point, STEPS[$step]), $recording, $expected).await;
        }
    )*};
}

// Every attempt committed on its own: a crash loses exactly the attempt it interrupted.
crash_points! { Recording::PerAttempt;
    before_validate: 0 => "before", Expected { status: "completed", attempts: retried(0), create_compensations: 0 };
    after_effect_validate: 0 => "after-effect", Expected { status: "completed", attempts: retried(0), create_compensations: 0 };
    after_commit_validate: 0 => "after-commit", Expected { status: "completed", attempts: retried(1), create_compensations: 0 };
    before_create_customers: 1 => "before", Expected { status: "completed", attempts: retried(1), create_compensations: 0 };
    after_effect_create_customers: 1 => "after-effect", Expected { status: "completed", attempts: retried(1), create_compensations: 0 };
    after_commit_create_customers: 1 => "after-commit", Expected { status: "completed", attempts: retried(2), create_compensations: 0 };
    before_customers_created: 2 => "before", Expected { status: "completed", attempts: retried(2), create_compensations: 0 };
    after_effect_customers_created: 2 => "after-effect", Expected { status: "completed", attempts: retried(2), create_compensations: 0 };
    after_commit_customers_created: 2 => "after-commit", Expected { status: "completed", attempts: retried(3), create_compensations: 0 };
    before_emit_customer_created: 3 => "before", Expected { status: "completed", attempts: retried(3), create_compensations: 0 };
    after_effect_emit_customer_created: 3 => "after-effect", Expected { status: "completed", attempts: retried(3), create_compensations: 0 };
    after_commit_emit_customer_created: 3 => "after-commit", Expected { status: "completed", attempts: retried(4), create_compensations: 0 };
    before_set_auth_app_metadata: 4 => "before", Expected { status: "completed", attempts: retried(4), create_compensations: 0 };
    after_effect_set_auth_app_metadata: 4 => "after-effect", Expected { status: "completed", attempts: retried(4), create_compensations: 0 };
    // The last commit completes the run: nothing is left to do after the restart.
    after_commit_set_auth_app_metadata: 4 => "after-commit", Expected { status: "completed", attempts: ALL_ONCE, create_compensations: 0 };
}

/// Fused: the insert commits the first step's start, then one segment runs all five steps and
/// commits once. A crash before that commit, at any step, loses the whole segment: the run is
/// where the insert left it, so only the first step's attempt is lost (and retried), and
/// nothing any step wrote survives to be done twice. A crash after it finds the run complete.
mod fused {
    use super::*;

    crash_points! { Recording::Fused;
        before_validate: 0 => "before", Expected { status: "completed", attempts: retried(0), create_compensations: 0 };
        after_effect_validate: 0 => "after-effect", Expected { status: "completed", attempts: retried(0), create_compensations: 0 };
        after_commit_validate: 0 => "after-commit", Expected { status: "completed", attempts: ALL_ONCE, create_compensations: 0 };
        before_create_customers: 1 => "before", Expected { status: "completed", attempts: retried(0), create_compensations: 0 };
        after_effect_create_customers: 1 => "after-effect", Expected { status: "completed", attempts: retried(0), create_compensations: 0 };
        after_commit_create_customers: 1 => "after-commit", Expected { status: "completed", attempts: ALL_ONCE, create_compensations: 0 };
        before_customers_created: 2 => "before", Expected { status: "completed", attempts: retried(0), create_compensations: 0 };
        after_commit_customers_created: 2 => "after-commit", Expected { status: "completed", attempts: ALL_ONCE, create_compensations: 0 };
        before_set_auth_app_metadata: 4 => "before", Expected { status: "completed", attempts: retried(0), create_compensations: 0 };
        after_effect_set_auth_app_metadata: 4 => "after-effect", Expected { status: "completed", attempts: retried(0), create_compensations: 0 };
        after_commit_set_auth_app_metadata: 4 => "after-commit", Expected { status: "completed", attempts: ALL_ONCE, create_compensations: 0 };
    }

    /// The unwind fused too: set-auth-app-metadata fails alone (an injected failure ends the
    /// segment before it), and the compensation of create-customers is interrupted before its
    /// segment commits: it is lost and done again, exactly as per attempt.
    #[tokio::test]
    async fn compensate_create_customers() {
        crash_at(
            "fail:set-auth-app-metadata:3,compensate:create-customers",
            Recording::Fused,
            Expected {
                status: "compensated",
                attempts: [1, 1, 1, 1, 3],
                create_compensations: 2,
            },
        )
        .await;
    }
}

/// The compensation of create-customers, reached by making set-auth-app-metadata fail all
/// its attempts, is interrupted after it deleted the customer but before that committed.
/// (set-auth-app-metadata's own compensation cannot be reached: it is the last step, so its
/// success completes the run.)
#[tokio::test]
async fn compensate_create_customers() {
    crash_at(
        "fail:set-auth-app-metadata:3,compensate:create-customers",
        Recording::PerAttempt,
        Expected {
            status: "compensated",
            attempts: [1, 1, 1, 1, 3],
            create_compensations: 2,
        },
    )
    .await;
}

/// Load: `runs` registrations through HTTP, clients retrying (same idempotency key) while
/// the server is down. Returns the keys that were accepted.
struct Load {
    accepted: Arc<AtomicUsize>,
    done: Arc<AtomicBool>,
    handles: Vec<tokio::task::JoinHandle<()>>,
}

/// How the clients of a load trigger.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Clients {
    /// None waits: every answer comes once the run is inserted.
    Answered,
    /// Half of them wait for their runs (`wait_ms`): those runs are inserted by their first
    /// segment, so a kill also strikes runs before they exist.
    HalfWaiting,
}

/// Starts `runs` registrations spread over `bases` with `concurrency` clients.
async fn start_load(
    db: &TestDb,
    bases: Vec<String>,
    runs: usize,
    concurrency: usize,
    prefix: &str,
    clients: Clients,
) -> Load {
    // Identities first (directly in the database: the servers may be down at any moment).
    let mut identities = Vec::with_capacity(runs);
    for i in 0..runs {
        let id = format!("authid_{prefix}{i:06}");
        identities.push(id.clone());
        sqlx::query("INSERT INTO auth_identities (id, provider, entity_id) VALUES ($1, 'emailpass', $2)")
            .bind(&id)
            .bind(format!("{prefix}{i}@example.com"))
            .execute(&db.pool)
            .await
            .expect("identity");
    }
    let accepted = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let next = Arc::new(AtomicUsize::new(0));
    let identities = Arc::new(identities);
    let bases = Arc::new(bases);
    let mut handles = Vec::new();
    for worker in 0..concurrency {
        let (accepted, done, next, identities, bases) = (
            accepted.clone(),
            done.clone(),
            next.clone(),
            identities.clone(),
            bases.clone(),
        );
        let prefix = prefix.to_string();
        handles.push(tokio::spawn(async move {
            let client = client();
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= identities.len() {
                    break;
                }
                let body = registration(&identities[i], &format!("{prefix}{i}@example.com"));
                let key = format!("{prefix}-{i}");
                let wait_ms = if clients == Clients::HalfWaiting && worker % 2 == 1 {
                    2000
                } else {
                    0
                };
                let mut attempt = 0usize;
                loop {
                    let base = &bases[(worker + attempt) % bases.len()];
                    match trigger_run(&client, base, &key, &body, wait_ms).await {
                        Ok(_) => {
                            accepted.fetch_add(1, Ordering::SeqCst);
                            break;
                        }
                        Err(_) => {
                            attempt += 1;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            }
            if next.load(Ordering::SeqCst) >= identities.len() {
                done.store(true, Ordering::SeqCst);
            }
        }));
    }
    Load {
        accepted,
        done,
        handles,
    }
}

impl Load {
    async fn finish(self) -> usize {
        for h in self.handles {
            h.await.expect("load task");
        }
        self.accepted.load(Ordering::SeqCst)
    }
}

fn seed() -> u64 {
    std::env::var("SAGAFLOW_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random)
}

fn chaos() -> bool {
    std::env::var("SAGAFLOW_CHAOS").is_ok_and(|v| v == "1")
}

/// Every registration ends completed (each with its customer) unless a kill cost a step all
/// of its attempts, in which case it ends compensated with nothing left behind.
async fn assert_registrations(db: &TestDb, expected_runs: usize) -> HashMap<String, i64> {
    let counts: Vec<(String, i64)> = sqlx::query_as("SELECT status::text, count(*) FROM runs GROUP BY status")
        .fetch_all(&db.pool)
        .await
        .expect("counts");
    let counts: HashMap<String, i64> = counts.into_iter().collect();
    let total: i64 = counts.values().sum();
    assert_eq!(total as usize, expected_runs, "runs by status: {counts:?}");
    let completed = counts.get("completed").copied().unwrap_or(0);
    let accounts: i64 = sqlx::query_scalar("SELECT count(*) FROM customers WHERE has_account")
        .fetch_one(&db.pool)
        .await
        .expect("count");
    assert_eq!(accounts, completed, "one customer per completed registration");
    counts
}

#[tokio::test]
async fn random_sigkill_under_load() {
    let seed = seed();
    println!("random_sigkill_under_load: SAGAFLOW_CHAOS_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let (runs, kills, instances) = if chaos() { (3000, 40, 3) } else { (300, 4, 1) };
    let db = test_db().await;
    let mut servers = Vec::new();
    for i in 0..instances {
        servers.push(ServerProcess::start(&db.url, Options::node(&format!("chaos-{i}"))).await);
    }
    let load = start_load(
        &db,
        servers.iter().map(ServerProcess::url).collect(),
        runs,
        16,
        "k",
        Clients::HalfWaiting,
    )
    .await;
    let started = Instant::now();
    let mut done_kills = 0;
    for _ in 0..kills {
        tokio::time::sleep(Duration::from_millis(rng.random_range(100..600))).await;
        let victim = rng.random_range(0..servers.len());
        servers[victim].kill9();
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..300))).await;
        let node = servers[victim].options.node.clone();
        servers[victim].restart(Options::node(&node)).await;
        done_kills += 1;
        if load.done.load(Ordering::SeqCst) {
            break;
        }
    }
    let accepted = load.finish().await;
    assert_eq!(accepted, runs);
    all_terminal(&db.pool, Duration::from_secs(300)).await;
    let counts = assert_registrations(&db, runs).await;
    println!(
        "random_sigkill_under_load (seed {seed}): {runs} runs on {instances} instance(s), {done_kills} SIGKILLs \
         in {:.1} s -> {counts:?}",
        started.elapsed().as_secs_f64()
    );
    assert_invariants(&db.pool).await;
}

#[tokio::test]
async fn several_instances_finish_a_killed_instances_runs() {
    let runs = if chaos() { 2000 } else { 300 };
    let db = test_db().await;
    let mut instances = Vec::new();
    for i in 0..3 {
        instances.push(ServerProcess::start(&db.url, Options::node(&format!("node-{i}"))).await);
    }
    let bases = instances.iter().map(ServerProcess::url).collect();
    let load = start_load(&db, bases, runs, 24, "m", Clients::HalfWaiting).await;
    // Kill node-0 while it holds leases (not after a fixed time: on a loaded machine it may
    // not have started a run by then).
    eventually(Duration::from_secs(60), "node-0 to hold a lease", || async {
        let held: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM runs r JOIN workers w ON w.id = r.lease_owner
             WHERE w.node_id = 'node-0' AND r.ready_at IS NULL",
        )
        .fetch_one(&db.pool)
        .await
        .expect("leases");
        (held > 0).then_some(())
    })
    .await;
    instances[0].kill9();
    let killed_at = chrono::Utc::now();
    let accepted = load.finish().await;
    assert_eq!(accepted, runs);
    all_terminal(&db.pool, Duration::from_secs(120)).await;
    assert_registrations(&db, runs).await;
    // How long until the others took over node-0's runs: first and last takeover after the kill.
    let takeover: (Option<f64>, Option<f64>, i64) = sqlx::query_as(
        "SELECT extract(epoch FROM min(at) - $1)::float8, extract(epoch FROM max(at) - $1)::float8, count(*)
         FROM run_events WHERE kind = 'lease_taken_over' AND detail->>'from' LIKE 'node-0#%'",
    )
    .bind(killed_at)
    .fetch_one(&db.pool)
    .await
    .expect("takeovers");
    println!(
        "several_instances: node-0 SIGKILLed; {} of its runs taken over, first after {:.3} s, last after {:.3} s",
        takeover.2,
        takeover.0.unwrap_or(f64::NAN),
        takeover.1.unwrap_or(f64::NAN)
    );
    assert!(
        takeover.2 > 0,
        "node-0 was killed under load with runs in flight; none was taken over"
    );
    assert_invariants(&db.pool).await;
}

#[tokio::test]
async fn a_paused_owner_is_fenced_when_it_wakes_up() {
    let db = test_db().await;
    let lease = Duration::from_millis(1500);
    let mut paused = ServerProcess::start(
        &db.url,
        Options {
            lease_ttl: lease,
            ..Options::node("sleepy")
        },
    )
    .await;
    let mut other = ServerProcess::start(
        &db.url,
        Options {
            lease_ttl: lease,
            ..Options::node("awake")
        },
    )
    .await;
    // Load on the first instance only, so it owns runs in flight when it freezes.
    let load = start_load(&db, vec![paused.url()], 200, 16, "p", Clients::HalfWaiting).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    paused.pause();
    let frozen_at = chrono::Utc::now();
    // Its runs are taken over once their leases expire (its database session is alive, so
    // nothing tells the others it is gone).
    let deadline = Instant::now() + Duration::from_secs(30);
    let taken: i64 = loop {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM run_events WHERE kind = 'lease_taken_over' AND detail->>'from' LIKE 'sleepy#%'",
        )
        .fetch_one(&db.pool)
        .await
        .expect("count");
        let unfinished: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM runs r WHERE r.status NOT IN ('completed', 'compensated', 'failed', 'cancelled')
               AND r.lease_owner IN (SELECT id FROM workers WHERE node_id = 'sleepy')",
        )
        .fetch_one(&db.pool)
        .await
        .expect("count");
        if n > 0 && unfinished == 0 {
            break n;
        }
        assert!(Instant::now() < deadline, "the frozen owner's runs were not taken over");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let first_takeover: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM min(at) - $1)::float8 FROM run_events WHERE kind = 'lease_taken_over'",
    )
    .bind(frozen_at)
    .fetch_one(&db.pool)
    .await
    .expect("time");
    // A lease is renewed every third of its duration, so the last renewal before the freeze was
    // at most a third of a lease earlier: no takeover may come before two thirds of a lease.
    let earliest = lease.as_secs_f64() * 2.0 / 3.0;
    assert!(
        first_takeover >= earliest * 0.95,
        "taken over after {first_takeover:.2} s, before the lease ran out"
    );
    // Wake it up: whatever it had in flight must not commit.
    paused.resume();
    let accepted = load.finish().await;
    assert_eq!(accepted, 200);
    all_terminal(&db.pool, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let metrics = client()
        .get(format!("{}/metrics", paused.url()))
        .bearer_auth(API_TOKEN)
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let fenced: f64 = metrics
        .lines()
        .find(|l| l.starts_with("sagaflow_fenced_writes_total"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    println!("paused owner: {taken} runs taken over, first after {first_takeover:.2} s; {fenced} late writes fenced");
    assert!(
        fenced >= 1.0,
        "the woken owner had writes in flight; none was fenced:\n{metrics}"
    );
    // The log of every taken-over run continues under the new owner only: after the takeover
    // no entry belongs to an attempt the old owner started (the checker's one-success rule and
    // gap-free rule would catch a late commit too).
    let late: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM run_events t JOIN run_events e ON e.run_id = t.run_id AND e.seq > t.seq
         WHERE t.kind = 'lease_taken_over' AND t.detail->>'from' LIKE 'sleepy#%'
           AND e.kind IN ('step_succeeded', 'step_failed') AND e.step IS NOT NULL
           AND NOT EXISTS (SELECT 1 FROM run_events s WHERE s.run_id = e.run_id AND s.seq > t.seq AND s.seq < e.seq
                           AND s.kind = 'step_started' AND s.step = e.step AND s.attempt = e.attempt)
           AND NOT (e.kind = 'step_failed' AND e.detail->>'error' LIKE 'attempt lost%')",
    )
    .fetch_one(&db.pool)
    .await
    .expect("late entries");
    assert_eq!(
        late, 0,
        "an outcome of an attempt started before the takeover was recorded after it"
    );
    assert_registrations(&db, 200).await;
    assert_invariants(&db.pool).await;
    other.kill9();
    paused.kill9();
}

/// A cluster of the test's own, with a migrated database `name`: the cluster, the database's
/// URL and a pool on it. A test that crashes its database needs one: crashing the shared one
/// would break the other tests.
async fn own_cluster(name: &str) -> (sagaflow::pg::embedded::EmbeddedPostgres, String, PgPool) {
    let cluster = tokio::task::spawn_blocking(sagaflow::pg::embedded::EmbeddedPostgres::start_ephemeral)
        .await
        .expect("join")
        .expect("cluster");
    let admin = cluster.url("postgres");
    sagaflow::pg::create_database_if_missing(&admin, name)
        .await
        .expect("database");
    let url = cluster.url(name);
    let pool = sagaflow::pg::pool(&url, &Default::default()).expect("pool");
    sagaflow::pg::migrate(&pool).await.expect("migrate");
    (cluster, url, pool)
}

#[tokio::test]
async fn the_database_going_away_under_load() {
    let (cluster, url, pool) = own_cluster("restarts").await;
    let db = TestDb {
        name: "restarts".into(),
        url: url.clone(),
        pool,
    };

    let mut server = ServerProcess::start(&url, Options::node("survivor")).await;
    let load = start_load(&db, vec![server.url()], 200, 16, "d", Clients::HalfWaiting).await;
    let cluster = Arc::new(cluster);
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let c = cluster.clone();
        tokio::task::spawn_blocking(move || c.crash())
            .await
            .expect("join")
            .expect("crash");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let c = cluster.clone();
        tokio::task::spawn_blocking(move || c.restart())
            .await
            .expect("join")
            .expect("restart");
    }
    let accepted = load.finish().await;
    assert_eq!(accepted, 200);
    all_terminal(&db.pool, Duration::from_secs(120)).await;
    assert!(
        server.is_running(),
        "the server died with the database:\n{}",
        server.log_text()
    );
    let counts = assert_registrations(&db, 200).await;
    println!("database restarts: {counts:?}");
    assert_invariants(&db.pool).await;
    server.kill9();
}

/// A waiting trigger while the database is away fails as a trigger that inserts its run
/// itself does: 503 `unavailable`, nothing written; once the database is back, its retry with
/// the same key registers the customer once.
#[tokio::test]
async fn a_waiting_trigger_while_the_database_is_away_is_503_and_its_retry_registers_once() {
    let (cluster, url, _) = own_cluster("away").await;
    let mut server = ServerProcess::start(&url, Options::node("waiting")).await;
    let patient = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client");
    let email = "away@example.com";
    let auth = identity(&patient, &server.url(), email).await;
    let body = registration(&auth, email);
    let cluster = Arc::new(cluster);
    let c = cluster.clone();
    tokio::task::spawn_blocking(move || c.crash())
        .await
        .expect("join")
        .expect("crash");
    let refused = trigger_run(&patient, &server.url(), "away-run", &body, 5000).await;
    let refusal = refused.expect_err("no run can be inserted without the database");
    assert!(refusal.starts_with("503"), "{refusal}");
    assert!(refusal.contains("unavailable"), "{refusal}");
    let c = cluster.clone();
    tokio::task::spawn_blocking(move || c.restart())
        .await
        .expect("join")
        .expect("restart");
    // Retried as a client retries a 503: the server's pools find their dead connections out
    // as they use them.
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        match trigger_and_wait(&patient, &server.url(), "away-run", &body).await {
            Ok((status, _)) => break status,
            Err(e) if Instant::now() < deadline && e.starts_with("503") => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("the retry is not answered: {e}"),
        }
    };
    assert_eq!(status, "completed");
    // The test's own connections died with the database.
    let pool = sagaflow::pg::pool(&url, &Default::default()).expect("pool");
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM runs")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!((runs, registered(&pool, email, &auth).await.0), (1, 1));
    assert_invariants(&pool).await;
    server.kill9();
}

/// `sagaflow_runs_inserted_alone_total` of `server`, by reason (the workflow's runs only).
async fn inserted_alone(server: &ServerProcess) -> HashMap<String, f64> {
    let text = client()
        .get(format!("{}/metrics", server.url()))
        .bearer_auth(API_TOKEN)
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    text.lines()
        .filter(|l| l.starts_with("sagaflow_runs_inserted_alone_total{"))
        .filter(|l| l.contains(&format!("workflow=\"{WORKFLOW}\"")))
        .filter_map(|l| {
            let reason = l.split("reason=\"").nth(1)?.split('"').next()?;
            let value = l.split_whitespace().last()?.parse().ok()?;
            Some((reason.to_string(), value))
        })
        .collect()
}

/// A registration of a new identity for `email`, its trigger waiting `wait_ms` (the email is
/// its key): the answer and the identity.
async fn register_waiting(server: &ServerProcess, email: &str, wait_ms: u32) -> (Value, String) {
    let http = client();
    let auth = identity(&http, &server.url(), email).await;
    let answered = trigger_run(&http, &server.url(), email, &registration(&auth, email), wait_ms)
        .await
        .expect("accepted");
    (answered, auth)
}

/// A waiting trigger whose run cannot go in with its first segment is inserted alone, and
/// counted so by reason; one that takes the fast path is not counted. (A process of its own:
/// the tests' in-process servers share one metrics recorder.)
#[tokio::test]
async fn waiting_triggers_that_miss_the_fast_path_are_counted_by_reason() {
    let db = test_db().await;
    let mut server = ServerProcess::start(&db.url, Options::node("counted")).await;
    let (answered, _) = register_waiting(&server, "fast@example.com", 5000).await;
    assert_eq!(answered["status"], "completed", "{answered}");
    assert_eq!(
        inserted_alone(&server).await,
        HashMap::new(),
        "a run inserted by its first segment is no fallback"
    );

    let pause = format!("/v1/workflows/{WORKFLOW}/pause");
    assert_eq!(operator_post(&server, &pause).await, reqwest::StatusCode::OK);
    let (answered, held) = register_waiting(&server, "held@example.com", 2000).await;
    assert_eq!(
        (&answered["status"], &answered["held"]),
        (&json!("pending"), &json!("workflow_paused"))
    );
    assert_eq!(
        inserted_alone(&server).await,
        HashMap::from([("refused".to_string(), 1.0)]),
        "the paused workflow refused the insert with the segment"
    );
    assert_eq!(
        registered(&db.pool, "held@example.com", &held).await.0,
        0,
        "nothing of it ran"
    );
    server.kill9();
}

#[tokio::test]
async fn sigterm_under_load_exits_0_and_the_next_instance_resumes_at_once() {
    let db = test_db().await;
    // Long leases: a run left leased would be stuck for a minute. No client waits: the server
    // answers the waiting requests before its worker drains, and by then the runs queued
    // behind them are done, so nothing would be left in flight to hand back.
    let long = Duration::from_secs(60);
    let mut first = ServerProcess::start(
        &db.url,
        Options {
            lease_ttl: long,
            ..Options::node("leaving")
        },
    )
    .await;
    let load = start_load(&db, vec![first.url()], 150, 16, "t", Clients::Answered).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let status = first.terminate(Duration::from_secs(30)).await;
    assert!(status.success(), "exit status {status}:\n{}", first.log_text());
    let leased: i64 = sqlx::query_scalar("SELECT count(*) FROM runs WHERE lease_owner IS NOT NULL")
        .fetch_one(&db.pool)
        .await
        .expect("count");
    assert_eq!(leased, 0, "leases left behind after SIGTERM");

    let started = Instant::now();
    let second = ServerProcess::start(
        &db.url,
        Options {
            lease_ttl: long,
            port: first.port,
            ..Options::node("arriving")
        },
    )
    .await;
    let accepted = load.finish().await;
    assert_eq!(accepted, 150);
    all_terminal(&db.pool, Duration::from_secs(30)).await;
    assert!(
        started.elapsed() < long / 2,
        "runs waited for leases: {:?}",
        started.elapsed()
    );
    let released: i64 = sqlx::query_scalar("SELECT count(*) FROM run_events WHERE kind = 'lease_released'")
        .fetch_one(&db.pool)
        .await
        .expect("count");
    println!(
        "SIGTERM: {released} runs handed back, all finished {:?} after the next start",
        started.elapsed()
    );
    assert!(
        released > 0,
        "SIGTERM under load handed no run back: nothing was in flight"
    );
    assert_registrations(&db, 150).await;
    assert_invariants(&db.pool).await;
    drop(second);
}

/// A defined saga whose three steps call `participant` (unsigned: the server processes run
/// without secret variables).
fn http_saga(participant: &common::participant::Participant) -> Value {
    json!({
        "endpoints": {"shop": {"base_url": participant.base_url(), "timeout": "20s"}},
        "steps": [
            {"name": "reserve", "invoke": {"endpoint": "shop", "path": "/reserve"},
             "compensate": {"endpoint": "shop", "path": "/release"}},
            {"name": "charge", "invoke": {"endpoint": "shop", "path": "/charge"},
             "compensate": {"endpoint": "shop", "path": "/refund"}},
            {"name": "ship", "invoke": {"endpoint": "shop", "path": "/ship"}}
        ]
    })
}

async fn define_and_trigger(server: &ServerProcess, participant: &common::participant::Participant) -> String {
    define(server, participant).await;
    trigger_defined(server, "http-saga", &json!({"order": 1})).await
}

async fn define(server: &ServerProcess, participant: &common::participant::Participant) {
    define_as(server, "http-saga", &http_saga(participant)).await;
}

/// Stores `definition` as the workflow `name` (a new one: 201).
async fn define_as(server: &ServerProcess, name: &str, definition: &Value) {
    let defined = client()
        .put(format!("{}/v1/workflow-definitions/{name}", server.url()))
        .bearer_auth(common::server::ADMIN_TOKEN)
        .json(definition)
        .send()
        .await
        .expect("define");
    assert_eq!(defined.status(), reqwest::StatusCode::CREATED);
}

/// Triggers a run of the workflow `name` and returns its id.
async fn trigger_defined(server: &ServerProcess, name: &str, input: &Value) -> String {
    let triggered: Value = client()
        .post(format!("{}/v1/workflows/{name}/runs", server.url()))
        .bearer_auth(API_TOKEN)
        .json(input)
        .send()
        .await
        .expect("trigger")
        .json()
        .await
        .expect("json");
    triggered["id"].as_str().expect("id").to_string()
}

/// Two server processes on `db` with 1.5 s leases: a run held past that by a frozen owner
/// is taken over by the other.
async fn short_leased(db: &TestDb, nodes: [&str; 2]) -> [ServerProcess; 2] {
    let start = |node: &str| {
        ServerProcess::start(
            &db.url,
            Options {
                lease_ttl: Duration::from_millis(1500),
                ..Options::node(node)
            },
        )
    };
    [start(nodes[0]).await, start(nodes[1]).await]
}

async fn run_status(pool: &PgPool, run: &str) -> String {
    sqlx::query_scalar("SELECT status::text FROM runs WHERE id = $1::uuid")
        .bind(run)
        .fetch_one(pool)
        .await
        .expect("status")
}

#[tokio::test]
async fn sigkill_while_a_participant_holds_a_call_open_resends_the_same_key_and_completes_once() {
    use common::participant::{Answer, Participant};
    let participant = Participant::start().await;
    participant.script(
        "/charge",
        [Answer::After(
            Duration::from_secs(30),
            Box::new(Answer::Json(200, json!({"late": true}))),
        )],
    );
    let db = test_db().await;
    let mut server = ServerProcess::start(&db.url, Options::node("http-crash")).await;
    let run = define_and_trigger(&server, &participant).await;
    eventually(Duration::from_secs(20), "the charge call to be held open", || async {
        (!participant.seen_at("/charge").is_empty()).then_some(())
    })
    .await;
    server.kill9();
    server.restart(Options::node("http-crash")).await;
    eventually(
        Duration::from_secs(30),
        "the run to complete after the restart",
        || async { (run_status(&db.pool, &run).await == "completed").then_some(()) },
    )
    .await;
    let charges = participant.seen_at("/charge");
    assert_eq!(charges.len(), 2, "the lost call is made again, once");
    assert_eq!(charges[0].header("idempotency-key"), format!("{run}:charge:invoke"));
    assert_eq!(
        charges[0].header("idempotency-key"),
        charges[1].header("idempotency-key")
    );
    assert_eq!(participant.paths(), ["/reserve", "/charge", "/charge", "/ship"]);
    let log = log_of(&db.pool, uuid::Uuid::parse_str(&run).expect("uuid")).await;
    assert!(
        log.iter().any(|(kind, step, _, detail)| kind == "step_failed"
            && step.as_deref() == Some("charge")
            && detail["lost"] == true),
        "the attempt in flight at the kill is logged as lost: {log:?}"
    );
    assert_invariants(&db.pool).await;
}

#[tokio::test]
async fn an_owner_paused_during_a_call_past_its_lease_is_fenced_when_the_answer_comes() {
    use common::participant::{Answer, Participant};
    let participant = Participant::start().await;
    // The first charge (the owner's) is answered after four seconds; the new owner's at once.
    participant.script(
        "/charge",
        [Answer::After(
            Duration::from_secs(4),
            Box::new(Answer::Json(200, json!({"by": "sleepy"}))),
        )],
    );
    let db = test_db().await;
    let [sleepy, awake] = short_leased(&db, ["sleepy", "awake"]).await;
    let run = define_and_trigger(&sleepy, &participant).await;
    eventually(
        Duration::from_secs(20),
        "the owner's charge call to be in flight",
        || async { (!participant.seen_at("/charge").is_empty()).then_some(()) },
    )
    .await;
    sleepy.pause();
    eventually(
        Duration::from_secs(30),
        "the other instance to finish the run",
        || async { (run_status(&db.pool, &run).await == "completed").then_some(()) },
    )
    .await;
    // Wake the old owner after its call was answered: its late outcome must not commit.
    tokio::time::sleep(Duration::from_secs(3)).await;
    sleepy.resume();
    eventually(
        Duration::from_secs(20),
        "the old owner to notice it was fenced",
        || async {
            sleepy
                .log_text()
                .contains("lease taken over by another worker; stopping without writing")
                .then_some(())
        },
    )
    .await;
    let output: Value = sqlx::query_scalar("SELECT output FROM run_steps WHERE run_id = $1::uuid AND name = 'charge'")
        .bind(&run)
        .fetch_one(&db.pool)
        .await
        .expect("output");
    assert_eq!(
        output,
        json!({"path": "/saga/charge", "n": 2}),
        "the new owner's outcome stands"
    );
    let charges = participant.seen_at("/charge");
    assert_eq!(charges.len(), 2);
    assert_eq!(
        charges[0].header("idempotency-key"),
        charges[1].header("idempotency-key")
    );
    assert_eq!(participant.seen_at("/ship").len(), 1, "the saga went on once");
    drop(awake);
    assert_invariants(&db.pool).await;
}

#[tokio::test]
async fn an_abort_after_the_participant_answered_calls_it_again_with_the_same_key() {
    use common::participant::Participant;
    let participant = Participant::start().await;
    let db = test_db().await;
    // after-effect: the participant has answered the charge; its outcome is not committed.
    let mut server = ServerProcess::start(
        &db.url,
        Options {
            faults: Some("after-effect:charge".into()),
            ..Options::node("http-fault")
        },
    )
    .await;
    define(&server, &participant).await;
    // The process may abort before it answers: the run is found in the database.
    let _ = client()
        .post(format!("{}/v1/workflows/http-saga/runs", server.url()))
        .bearer_auth(API_TOKEN)
        .json(&json!({"order": 1}))
        .send()
        .await;
    let status = server.wait_exit(Duration::from_secs(30)).await;
    let run: String = sqlx::query_scalar("SELECT id::text FROM runs WHERE workflow = 'http-saga'")
        .fetch_one(&db.pool)
        .await
        .expect("the run");
    assert_eq!(status.signal(), Some(6), "aborted by the fault point: {status:?}");
    assert_eq!(participant.paths(), ["/reserve", "/charge"]);
    server.restart(Options::node("http-fault")).await;
    eventually(
        Duration::from_secs(30),
        "the run to complete after the restart",
        || async { (run_status(&db.pool, &run).await == "completed").then_some(()) },
    )
    .await;
    let charges = participant.seen_at("/charge");
    assert_eq!(charges.len(), 2, "the answered but unrecorded call is made again");
    assert_eq!(
        charges[0].header("idempotency-key"),
        charges[1].header("idempotency-key")
    );
    assert_eq!(participant.paths(), ["/reserve", "/charge", "/charge", "/ship"]);
    assert_invariants(&db.pool).await;
}

#[tokio::test]
async fn a_call_longer_than_the_lease_keeps_its_lease() {
    use common::participant::{Answer, Participant};
    let participant = Participant::start().await;
    // Twice the lease: only the heartbeat keeps the run from being taken over meanwhile.
    participant.script(
        "/charge",
        [Answer::After(
            Duration::from_secs(3),
            Box::new(Answer::Json(200, json!({"slow": true}))),
        )],
    );
    let db = test_db().await;
    let [owner, other] = short_leased(&db, ["patient", "eager"]).await;
    let run = define_and_trigger(&owner, &participant).await;
    eventually(Duration::from_secs(30), "the run to complete", || async {
        (run_status(&db.pool, &run).await == "completed").then_some(())
    })
    .await;
    let log = log_of(&db.pool, uuid::Uuid::parse_str(&run).expect("uuid")).await;
    assert!(
        !log.iter().any(|(kind, ..)| kind == "lease_taken_over"),
        "the run was taken over during a long call: {log:?}"
    );
    assert_eq!(participant.seen_at("/charge").len(), 1, "called once");
    drop(other);
    assert_invariants(&db.pool).await;
}

/// A crash while segments of several runs share a batch's transaction: the 6th time
/// set-auth-app-metadata's work is done, before the batch commits, the process aborts. Only
/// uncommitted work is lost: every run accepted resumes from its last commit and completes,
/// exactly one customer each, the outbox released for each, every invariant holding.
/// Triggers a registration and waits for it: `Ok((status, run id))` once answered.
async fn trigger_and_wait(
    client: &reqwest::Client,
    base: &str,
    key: &str,
    body: &Value,
) -> Result<(String, String), String> {
    let run = trigger_run(client, base, key, body, 5000).await?;
    let field = |name: &str| run[name].as_str().unwrap_or_default().to_string();
    Ok((field("status"), field("id")))
}

/// A trigger that waits leaves its run's insert to the run's first segment, so the run and
/// everything its local steps did commit together. Aborted before that commit (before a
/// step, after a step's work), nothing of the run is left: no run, no customer, no linked
/// identity, no event, and the caller got no answer; its retry with the same key registers
/// the customer once. Aborted just after the commit, the run is there, completed, and the
/// retry answers with it.
#[tokio::test]
async fn a_waiting_trigger_killed_in_the_segment_that_inserts_its_run_leaves_all_of_it_or_none() {
    let cases = [
        ("before:create-customers", false),
        ("after-effect:set-auth-app-metadata", false),
        ("after-commit:set-auth-app-metadata", true),
    ];
    for (fault, committed) in cases {
        let db = test_db().await;
        let mut server = ServerProcess::start(
            &db.url,
            Options {
                faults: Some(fault.to_string()),
                ..Options::node("inserting")
            },
        )
        .await;
        let client = client();
        let email = "waiting@example.com";
        let auth = identity(&client, &server.url(), email).await;
        let body = registration(&auth, email);
        let answered = trigger_and_wait(&client, &server.url(), "waiting-run", &body).await;
        let status = server.wait_exit(Duration::from_secs(30)).await;
        assert_eq!(status.signal(), Some(6), "{fault} did not abort the process ({status})");
        let run = run_id_by_key(&db.pool, "waiting-run").await;
        if committed {
            let run = run.expect("the committed segment inserted the run");
            let status: String = sqlx::query_scalar("SELECT status::text FROM runs WHERE id = $1")
                .bind(run)
                .fetch_one(&db.pool)
                .await
                .expect("run");
            assert_eq!(status, "completed", "{fault}");
            assert_eq!(registered(&db.pool, email, &auth).await.0, 1, "{fault}");
        } else {
            assert!(
                answered.is_err(),
                "{fault}: answered {answered:?} before anything was durable"
            );
            assert_eq!(run, None, "{fault}: a run is left of a segment that never committed");
            let events: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_events")
                .fetch_one(&db.pool)
                .await
                .expect("count");
            let (customers, linked) = registered(&db.pool, email, &auth).await;
            assert_eq!((customers, linked, events), (0, None, 0), "{fault}");
        }

        server.restart(Options::node("inserting")).await;
        let (status, id) = trigger_and_wait(&client, &server.url(), "waiting-run", &body)
            .await
            .expect("the retry is answered");
        assert_eq!(status, "completed", "{fault}");
        if let Some(run) = run {
            assert_eq!(id, run.to_string(), "{fault}: the retry answers with the committed run");
        }
        let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM runs")
            .fetch_one(&db.pool)
            .await
            .expect("count");
        assert_eq!((runs, registered(&db.pool, email, &auth).await.0), (1, 1), "{fault}");
        assert_invariants(&db.pool).await;
        server.kill9();
    }
}

/// The settings that gather the waiting triggers a test sends together into one cohort:
/// one runner waiting long enough for all of them, and no lanes, so that whatever shares a
/// transaction shared a cohort.
fn gathering(node: &str) -> Options {
    Options {
        env: vec![
            ("SAGAFLOW_COHORT_RUNNERS".into(), "1".into()),
            ("SAGAFLOW_COHORT_GATHER".into(), "500ms".into()),
            ("SAGAFLOW_COMMIT_LANES".into(), "0".into()),
        ],
        ..Options::node(node)
    }
}

/// Waiting triggers sent together go through their steps as one cohort. Aborted before a
/// batch call or after one (before the cohort's commit), nothing of any of its runs is left
/// and no caller was answered; aborted after the commit, every run is there, completed.
/// Either way each caller's retry with its key ends with its customer registered once, and
/// every invariant holds.
#[tokio::test]
async fn a_crash_inside_a_cohort_leaves_all_of_its_runs_or_none() {
    let count = 6;
    let cases = [
        ("before:emit-customer-created:4", false),
        ("after-effect:set-auth-app-metadata:3", false),
        ("after-commit:set-auth-app-metadata:2", true),
    ];
    for (fault, committed) in cases {
        let db = test_db().await;
        let node = "cohort-crash";
        let mut server = ServerProcess::start(
            &db.url,
            Options {
                faults: Some(fault.to_string()),
                ..gathering(node)
            },
        )
        .await;
        let client = client();
        let mut bodies = Vec::new();
        for i in 0..count {
            let email = format!("cohort{i}@example.com");
            let auth = identity(&client, &server.url(), &email).await;
            bodies.push((format!("cohort-{i}"), email, auth));
        }
        let answers = futures::future::join_all(bodies.iter().map(|(key, email, auth)| {
            let body = registration(auth, email);
            let (client, base) = (&client, server.url());
            async move { trigger_and_wait(client, &base, key, &body).await }
        }))
        .await;
        let status = server.wait_exit(Duration::from_secs(30)).await;
        assert_eq!(status.signal(), Some(6), "{fault} did not abort the process ({status})");
        let (runs, customers, events): (i64, i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM runs), (SELECT count(*) FROM customers), (SELECT count(*) FROM outbox_events)",
        )
        .fetch_one(&db.pool)
        .await
        .expect("count");
        if committed {
            assert_eq!((runs, customers, events), (count, count, count), "{fault}");
            let completed: i64 = sqlx::query_scalar("SELECT count(*) FROM runs WHERE status = 'completed'")
                .fetch_one(&db.pool)
                .await
                .expect("count");
            assert_eq!(completed, count, "{fault}");
            let writers: i64 = sqlx::query_scalar("SELECT count(DISTINCT xmin::text) FROM runs")
                .fetch_one(&db.pool)
                .await
                .expect("count");
            assert_eq!(writers, 1, "{fault}: the runs were one cohort");
        } else {
            assert!(
                answers.iter().all(Result::is_err),
                "{fault}: answered before anything was durable: {answers:?}"
            );
            assert_eq!(
                (runs, customers, events),
                (0, 0, 0),
                "{fault}: something of the cohort is left"
            );
            let linked: i64 =
                sqlx::query_scalar("SELECT count(*) FROM auth_identities WHERE app_metadata ? 'customer_id'")
                    .fetch_one(&db.pool)
                    .await
                    .expect("count");
            assert_eq!(linked, 0, "{fault}");
        }

        server.restart(gathering(node)).await;
        for (key, email, auth) in &bodies {
            let (status, _) = trigger_and_wait(&client, &server.url(), key, &registration(auth, email))
                .await
                .expect("the retry is answered");
            assert_eq!(status, "completed", "{fault}: {key}");
            assert_eq!(registered(&db.pool, email, auth).await.0, 1, "{fault}: {email}");
        }
        let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM runs")
            .fetch_one(&db.pool)
            .await
            .expect("count");
        assert_eq!(runs, count, "{fault}: one run per key");
        assert_invariants(&db.pool).await;
        server.kill9();
    }
}

#[tokio::test]
async fn a_crash_inside_a_batch_loses_only_its_uncommitted_work_and_every_run_resumes() {
    let db = test_db().await;
    let node = "batch-crash";
    let (mut server, accepted) =
        abort_among_registrations(&db, node, "after-effect:set-auth-app-metadata:6", "batch", 12).await;
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM runs")
        .fetch_one(&db.pool)
        .await
        .expect("count");
    assert!(runs >= accepted as i64);

    server.restart(Options::node(node)).await;
    all_terminal(&db.pool, Duration::from_secs(30)).await;
    let statuses: Vec<String> = sqlx::query_scalar("SELECT status::text FROM runs")
        .fetch_all(&db.pool)
        .await
        .expect("statuses");
    assert!(statuses.iter().all(|s| s == "completed"), "{statuses:?}");
    let (customers, released): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM customers), (SELECT count(*) FROM outbox_events WHERE status = 'released')",
    )
    .fetch_one(&db.pool)
    .await
    .expect("count");
    assert_eq!((customers, released), (runs, runs));
    // The runs whose segment the crash lost were taken over and lost exactly one attempt.
    let lost: Vec<i64> = sqlx::query_scalar(
        "SELECT sum(lost_attempts)::int8 FROM run_steps GROUP BY run_id HAVING sum(lost_attempts) > 0",
    )
    .fetch_all(&db.pool)
    .await
    .expect("lost");
    assert!(!lost.is_empty() && lost.iter().all(|l| *l == 1), "{lost:?}");
    assert_invariants(&db.pool).await;
    server.kill9();
}

/// Triggers a registration for each identity at once (no wait), emails `<prefix><i>@…`;
/// returns how many were accepted.
async fn register_together(client: &reqwest::Client, base: &str, prefix: &str, identities: &[String]) -> usize {
    futures::future::join_all(identities.iter().enumerate().map(|(i, auth)| {
        let body = registration(auth, &format!("{prefix}{i}@example.com"));
        let key = format!("{prefix}-{i}");
        async move { trigger(client, base, &key, &body).await }
    }))
    .await
    .iter()
    .filter(|accepted| accepted.is_ok())
    .count()
}

/// Starts a server with `faults`, registers `count` new identities together (so their
/// segments share batches) and waits for the fault to abort the process. Returns the dead
/// server, to restart, and how many registrations were accepted.
async fn abort_among_registrations(
    db: &TestDb,
    node: &str,
    faults: &str,
    prefix: &str,
    count: usize,
) -> (ServerProcess, usize) {
    let mut server = ServerProcess::start(
        &db.url,
        Options {
            faults: Some(faults.to_string()),
            ..Options::node(node)
        },
    )
    .await;
    let client = client();
    let mut identities = Vec::new();
    for i in 0..count {
        identities.push(identity(&client, &server.url(), &format!("{prefix}{i}@example.com")).await);
    }
    let accepted = register_together(&client, &server.url(), prefix, &identities).await;
    let status = server.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(
        status.signal(),
        Some(6),
        "the fault {faults} did not abort the process ({status})"
    );
    (server, accepted)
}

/// When the last write of each run committed: runs whose writes share a time committed in
/// one batch. (The test clusters record commit times, `track_commit_timestamp`.)
async fn commit_times(pool: &PgPool) -> Vec<(uuid::Uuid, i64, chrono::DateTime<chrono::Utc>)> {
    let tracked: String = sqlx::query_scalar("SHOW track_commit_timestamp")
        .fetch_one(pool)
        .await
        .expect("setting");
    assert_eq!(
        tracked, "on",
        "this test needs a cluster with track_commit_timestamp = on (the tests' own has it)"
    );
    sqlx::query_as(
        "SELECT r.id, (SELECT sum(lost_attempts)::int8 FROM run_steps s WHERE s.run_id = r.id),
                pg_xact_commit_timestamp(r.xmin)
         FROM runs r",
    )
    .fetch_all(pool)
    .await
    .expect("commit times")
}

/// A run that may have killed its last owner runs alone. Registrations accepted together
/// share batches; the process aborts in one of their segments, taking the batch's
/// uncommitted peers with it. After the restart every run that lost an attempt commits on
/// its own, in a transaction no other run's write is in, so a step that kills the process
/// again takes no peers with it; fresh runs accepted together still share batches.
#[tokio::test]
async fn runs_resumed_after_an_unclean_stop_commit_alone() {
    let db = test_db().await;
    let node = "suspects";
    let (mut server, _) =
        abort_among_registrations(&db, node, "after-effect:emit-customer-created:4", "suspect", 12).await;
    let client = client();

    server.restart(Options::node(node)).await;
    all_terminal(&db.pool, Duration::from_secs(30)).await;
    let times = commit_times(&db.pool).await;
    let suspects: Vec<_> = times.iter().filter(|(_, lost, _)| *lost > 0).collect();
    assert!(!suspects.is_empty(), "the crash left no run to resume: {times:?}");
    for (run, _, at) in &suspects {
        let sharing = times.iter().filter(|(_, _, other)| other == at).count();
        assert_eq!(
            sharing, 1,
            "resumed run {run} committed in a batch of {sharing}: {times:?}"
        );
    }

    // Fresh runs accepted together do share a batch (a few rounds, should the first
    // happen to find the lanes free each time).
    let mut batched = false;
    for round in 0..5 {
        let mut identities = Vec::new();
        for i in 0..16 {
            identities.push(identity(&client, &server.url(), &format!("fresh{round}x{i}@example.com")).await);
        }
        register_together(&client, &server.url(), &format!("fresh{round}x"), &identities).await;
        all_terminal(&db.pool, Duration::from_secs(30)).await;
        let times = commit_times(&db.pool).await;
        batched = times
            .iter()
            .any(|(run, lost, at)| *lost == 0 && times.iter().any(|(other, _, t)| other != run && t == at));
        if batched {
            break;
        }
    }
    assert!(batched, "runs accepted together never shared a batch");
    assert_invariants(&db.pool).await;
    server.kill9();
}

/// A defined saga that reserves, waits for the payment's signal (an hour), then ships.
fn waiting_saga(participant: &common::participant::Participant) -> Value {
    json!({
        "endpoints": {"shop": {"base_url": participant.base_url(), "timeout": "20s"}},
        "steps": [
            {"name": "reserve", "invoke": {"endpoint": "shop", "path": "/reserve"},
             "compensate": {"endpoint": "shop", "path": "/release"}},
            {"name": "await-payment", "wait": {"signal": "payment.succeeded", "timeout": "1h"}},
            {"name": "ship", "invoke": {"endpoint": "shop", "path": "/ship"}}
        ]
    })
}

async fn define_waiting(server: &ServerProcess, participant: &common::participant::Participant) {
    define_as(server, "waiting-saga", &waiting_saga(participant)).await;
}

async fn trigger_waiting(server: &ServerProcess, n: usize) -> String {
    trigger_defined(server, "waiting-saga", &json!({"order": n})).await
}

async fn waiting_unleased(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM runs WHERE wait_kind IS NOT NULL AND lease_owner IS NULL")
        .fetch_one(pool)
        .await
        .expect("count")
}

async fn signal(server: &ServerProcess, run: &str, key: &str) -> reqwest::StatusCode {
    client()
        .post(format!("{}/v1/runs/{run}/signals/payment.succeeded", server.url()))
        .bearer_auth(API_TOKEN)
        .header("idempotency-key", key)
        .json(&json!({"paid": run}))
        .send()
        .await
        .expect("signal")
        .status()
}

/// The waits of every run, as (consumed deliveries, `signal_received` entries, wait attempts).
async fn consumptions(pool: &PgPool) -> Vec<(i64, i64, i32)> {
    sqlx::query_as(
        "SELECT (SELECT count(*) FROM run_inbox i WHERE i.run_id = r.id AND i.consumed_at IS NOT NULL),
                (SELECT count(*) FROM run_events e WHERE e.run_id = r.id AND e.kind = 'signal_received'),
                s.attempts
         FROM runs r JOIN run_steps s ON s.run_id = r.id AND s.name = 'await-payment'
         ORDER BY r.created_at",
    )
    .fetch_all(pool)
    .await
    .expect("consumptions")
}

#[tokio::test]
async fn sigkill_while_runs_wait_loses_no_wait_and_every_signal_is_consumed_once() {
    let participant = common::participant::Participant::start().await;
    let db = test_db().await;
    let mut server = ServerProcess::start(&db.url, Options::node("waits")).await;
    define_waiting(&server, &participant).await;
    let mut runs = Vec::new();
    for n in 0..6 {
        runs.push(trigger_waiting(&server, n).await);
    }
    eventually(Duration::from_secs(20), "every run to wait", || async {
        (waiting_unleased(&db.pool).await == 6).then_some(())
    })
    .await;
    // One signal before the kill; two more to runs still waiting, the kill right after.
    assert_eq!(signal(&server, &runs[0], "k0").await, reqwest::StatusCode::ACCEPTED);
    assert_eq!(signal(&server, &runs[1], "k1").await, reqwest::StatusCode::ACCEPTED);
    assert_eq!(signal(&server, &runs[2], "k2").await, reqwest::StatusCode::ACCEPTED);
    server.kill9();
    server.restart(Options::node("waits")).await;
    // The webhook sender retries what it is not sure went through, then sends the rest.
    for (i, run) in runs.iter().enumerate() {
        let status = signal(&server, run, &format!("k{i}")).await;
        assert!(status.is_success(), "{status}");
    }
    all_terminal(&db.pool, Duration::from_secs(30)).await;
    for run in &runs {
        assert_eq!(run_status(&db.pool, run).await, "completed");
    }
    assert_eq!(
        consumptions(&db.pool).await,
        vec![(1, 1, 1); 6],
        "each wait consumed one signal, once, in its first attempt (a wait is not lost with its worker)"
    );
    // A ship call in flight at the kill is made again with the same key (at least once):
    // each run shipped under one key.
    let ships = participant.seen_at("/ship");
    let keys: std::collections::BTreeSet<String> = ships.iter().map(|r| r.header("idempotency-key")).collect();
    assert_eq!(keys.len(), 6, "one ship per run: {keys:?}");
    // Three runs were signalled just before the kill, so up to three ship calls can be in
    // flight then (this bound said one, and failed once in CI-like runs when two were).
    assert!(
        ships.len() <= 6 + 3,
        "only calls in flight at the kill are repeated: {} ship calls",
        ships.len()
    );
    assert_invariants(&db.pool).await;
}

#[tokio::test]
async fn sigkill_while_a_signal_is_being_consumed_keeps_it_for_the_next_owner() {
    let participant = common::participant::Participant::start().await;
    let db = test_db().await;
    let faulty = Options {
        faults: Some("after-effect:await-payment".into()),
        ..Options::node("consume")
    };
    let mut server = ServerProcess::start(&db.url, faulty).await;
    define_waiting(&server, &participant).await;
    let run = trigger_waiting(&server, 1).await;
    eventually(Duration::from_secs(20), "the run to wait", || async {
        (waiting_unleased(&db.pool).await == 1).then_some(())
    })
    .await;
    assert_eq!(signal(&server, &run, "evt").await, reqwest::StatusCode::ACCEPTED);
    let status = server.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(
        status.signal(),
        Some(6),
        "aborted (SIGABRT) taking the signal: {status:?}"
    );
    let pending: (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE consumed_at IS NULL), count(*) FROM run_inbox WHERE run_id = $1::uuid",
    )
    .bind(&run)
    .fetch_one(&db.pool)
    .await
    .expect("inbox");
    assert_eq!(
        pending,
        (1, 1),
        "the crash undid the consumption: the signal is still there"
    );
    server.restart(Options::node("consume")).await;
    all_terminal(&db.pool, Duration::from_secs(30)).await;
    assert_eq!(run_status(&db.pool, &run).await, "completed");
    assert_eq!(consumptions(&db.pool).await, [(1, 1, 1)]);
    assert_invariants(&db.pool).await;
}

/// An asynchronous capture: answered 202, completed later by the participant.
fn async_saga(participant: &common::participant::Participant) -> Value {
    json!({
        "endpoints": {"shop": {"base_url": participant.base_url(), "timeout": "20s"}},
        "steps": [
            {"name": "capture", "invoke": {"endpoint": "shop", "path": "/capture"},
             "compensate": {"endpoint": "shop", "path": "/refund"},
             "async": {"timeout": "1h"}}
        ]
    })
}

#[tokio::test]
async fn a_completion_from_the_attempt_lost_in_a_takeover_is_stale_and_the_current_one_completes() {
    use common::participant::{Answer, Participant};
    let participant = Participant::start().await;
    // The first call is held open past the kill; the second (the same key, attempt 2) is
    // accepted at once.
    participant.script(
        "/capture",
        [
            Answer::After(
                Duration::from_secs(30),
                Box::new(Answer::Json(202, json!({"ticket": 1}))),
            ),
            Answer::Json(202, json!({"ticket": 2})),
        ],
    );
    let db = test_db().await;
    let mut server = ServerProcess::start(&db.url, Options::node("async")).await;
    define_as(&server, "async-saga", &async_saga(&participant)).await;
    let run = trigger_defined(&server, "async-saga", &json!({"order": 1})).await;
    eventually(Duration::from_secs(20), "the capture call to be held open", || async {
        (!participant.seen_at("/capture").is_empty()).then_some(())
    })
    .await;
    server.kill9();
    server.restart(Options::node("async")).await;
    eventually(
        Duration::from_secs(20),
        "attempt 2 to wait for its completion",
        || async { (waiting_unleased(&db.pool).await == 1).then_some(()) },
    )
    .await;
    let calls = participant.seen_at("/capture");
    assert_eq!(
        calls.iter().map(|c| c.header("sagaflow-attempt")).collect::<Vec<_>>(),
        ["1", "2"]
    );
    assert_eq!(calls[0].header("idempotency-key"), calls[1].header("idempotency-key"));
    let complete = |attempt: &str| {
        client()
            .post(format!("{}/v1/runs/{run}/steps/capture/complete", server.url()))
            .bearer_auth(API_TOKEN)
            .header("sagaflow-attempt", attempt)
            .json(&json!({"output": {"captured": attempt}}))
            .send()
    };
    let stale = complete("1").await.expect("complete");
    assert_eq!(stale.status(), reqwest::StatusCode::CONFLICT);
    let body: Value = stale.json().await.expect("json");
    assert_eq!(body["error"]["code"], "stale_attempt", "{body}");
    let current = complete("2").await.expect("complete");
    assert_eq!(current.status(), reqwest::StatusCode::ACCEPTED);
    all_terminal(&db.pool, Duration::from_secs(30)).await;
    assert_eq!(run_status(&db.pool, &run).await, "completed");
    let output: Value = sqlx::query_scalar("SELECT output FROM run_steps WHERE run_id = $1::uuid")
        .bind(&run)
        .fetch_one(&db.pool)
        .await
        .expect("output");
    assert_eq!(output, json!({"captured": "2"}));
    assert_invariants(&db.pool).await;
}

/// Posts an operator action (admin token) and returns its status.
async fn operator_post(server: &ServerProcess, path: &str) -> reqwest::StatusCode {
    client()
        .post(format!("{}{path}", server.url()))
        .bearer_auth(common::server::ADMIN_TOKEN)
        .header("x-sagaflow-operator", "ops")
        .send()
        .await
        .expect("operator action")
        .status()
}

#[tokio::test]
async fn a_pause_asked_for_during_a_call_survives_a_sigkill_and_the_run_resumes_once_resumed() {
    use common::participant::{Answer, Participant};
    let participant = Participant::start().await;
    participant.script(
        "/charge",
        [Answer::After(
            Duration::from_secs(30),
            Box::new(Answer::Json(200, json!({"late": true}))),
        )],
    );
    let db = test_db().await;
    let mut server = ServerProcess::start(&db.url, Options::node("pause-crash")).await;
    let run = define_and_trigger(&server, &participant).await;
    eventually(Duration::from_secs(20), "the charge call to be held open", || async {
        (!participant.seen_at("/charge").is_empty()).then_some(())
    })
    .await;
    // The pause is asked for while the charge is in flight; the owner dies before recording it.
    assert_eq!(
        operator_post(&server, &format!("/v1/runs/{run}/pause")).await,
        reqwest::StatusCode::ACCEPTED
    );
    server.kill9();
    server.restart(Options::node("pause-crash")).await;
    // The next owner records the lost attempt and pauses instead of calling again.
    eventually(
        Duration::from_secs(30),
        "the run to pause after the restart",
        || async { (run_status(&db.pool, &run).await == "paused").then_some(()) },
    )
    .await;
    let (lease, ready): (Option<i32>, Option<chrono::DateTime<chrono::Utc>>) =
        sqlx::query_as("SELECT lease_owner, ready_at FROM runs WHERE id = $1::uuid")
            .bind(&run)
            .fetch_one(&db.pool)
            .await
            .expect("row");
    assert_eq!(
        (lease, ready),
        (None, None),
        "a paused run holds no lease and is not due"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        participant.seen_at("/charge").len(),
        1,
        "nothing is called while paused"
    );
    assert_invariants(&db.pool).await;

    assert_eq!(
        operator_post(&server, &format!("/v1/runs/{run}/resume")).await,
        reqwest::StatusCode::OK
    );
    eventually(Duration::from_secs(30), "the run to complete once resumed", || async {
        (run_status(&db.pool, &run).await == "completed").then_some(())
    })
    .await;
    assert_eq!(participant.paths(), ["/reserve", "/charge", "/charge", "/ship"]);
    let kinds: Vec<String> = log_of(&db.pool, uuid::Uuid::parse_str(&run).expect("uuid"))
        .await
        .into_iter()
        .map(|(kind, ..)| kind)
        .filter(|kind| {
            [
                "pause_requested",
                "run_paused",
                "run_resumed",
                "lease_taken_over",
                "run_claimed",
            ]
            .contains(&kind.as_str())
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "run_claimed",
            "pause_requested",
            "lease_taken_over",
            "run_paused",
            "run_resumed",
            "run_claimed"
        ]
    );
    // The restarted process's own log: it paused the run, in plain text (no colour codes in
    // a file).
    let log = server.log_text();
    assert!(log.contains("run paused by an operator"), "{log}");
    assert!(!log.contains('\u{1b}'), "a log written to a file has no colour codes");
    assert_invariants(&db.pool).await;
}

#[tokio::test]
async fn a_sigkill_between_outcomes_and_their_deliveries_delivers_exactly_the_committed_outcomes_after_restart() {
    use common::participant::{Answer, Participant};
    const SECRET: &str = "whsec_MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
    let receiver = Participant::start().await;
    // The first attempt is held open past the kill: the delivery is in flight when it lands.
    receiver.script(
        "/hook",
        [Answer::After(
            Duration::from_secs(30),
            Box::new(Answer::Json(200, json!({}))),
        )],
    );
    let participant = Participant::start().await;
    let db = test_db().await;
    let options = || Options {
        env: vec![
            ("SAGAFLOW_TEST_HOOK_SECRET".into(), SECRET.into()),
            ("SAGAFLOW_WEBHOOK_ATTEMPT_TIMEOUT".into(), "1s".into()),
        ],
        ..Options::node("hooks")
    };
    let mut server = ServerProcess::start(&db.url, options()).await;
    define(&server, &participant).await;
    let subscribed = client()
        .post(format!("{}/v1/webhooks", server.url()))
        .bearer_auth(common::server::ADMIN_TOKEN)
        .json(&json!({"name": "ops", "url": format!("{}/hook", receiver.base_url()),
                       "events": ["run.completed"], "secret_env": "SAGAFLOW_TEST_HOOK_SECRET"}))
        .send()
        .await
        .expect("subscribe");
    assert_eq!(subscribed.status(), reqwest::StatusCode::CREATED);
    let mut runs = Vec::new();
    for n in 0..5 {
        runs.push(trigger_defined(&server, "http-saga", &json!({"order": n})).await);
    }
    all_terminal(&db.pool, Duration::from_secs(30)).await;
    eventually(
        Duration::from_secs(20),
        "the first delivery to be in flight",
        || async { (!receiver.seen_at("/hook").is_empty()).then_some(()) },
    )
    .await;
    server.kill9();
    let committed: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT id FROM runs WHERE status = 'completed' ORDER BY id")
        .fetch_all(&db.pool)
        .await
        .expect("runs");
    assert_eq!(committed.len(), 5);
    server.restart(options()).await;
    eventually(Duration::from_secs(30), "every delivery to be accepted", || async {
        let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM webhook_deliveries WHERE status <> 'delivered'")
            .fetch_one(&db.pool)
            .await
            .expect("count");
        (pending == 0).then_some(())
    })
    .await;
    let seen = receiver.seen_at("/hook");
    let mut delivered: Vec<uuid::Uuid> = seen
        .iter()
        .filter_map(|r| {
            r.body["data"]["run"]["id"]
                .as_str()
                .and_then(|id| uuid::Uuid::parse_str(id).ok())
        })
        .collect();
    let ids: std::collections::BTreeSet<String> = seen.iter().map(|r| r.header("webhook-id")).collect();
    assert_eq!(ids.len(), 5, "one webhook-id per committed outcome: {ids:?}");
    // At least once: what was in flight (or answered but not yet recorded) at the kill is
    // sent again, always under the id of its outcome.
    let mut run_of_id = std::collections::HashMap::new();
    for request in &seen {
        let run = request.body["data"]["run"]["id"].clone();
        assert_eq!(
            run_of_id
                .entry(request.header("webhook-id"))
                .or_insert_with(|| run.clone()),
            &run,
            "one id, one outcome"
        );
    }
    assert!(seen.len() > 5, "the attempt held open at the kill was made again");
    delivered.sort();
    delivered.dedup();
    assert_eq!(delivered, committed, "exactly the committed outcomes");
    assert_invariants(&db.pool).await;
}

/// A server whose stderr nobody reads any more (a supervisor that stopped draining the pipe)
/// keeps serving: its log lines are written by a thread of their own, never by the runtime's,
/// so a full pipe drops lines instead of stalling every run. At `debug` the log fills the
/// pipe's 64 KiB within a few dozen registrations.
#[tokio::test]
async fn a_server_whose_log_nobody_reads_keeps_serving() {
    let db = test_db().await;
    let mut options = Options::node("unread-log");
    options.stderr_unread = true;
    options
        .env
        .push(("RUST_LOG".into(), "debug,sqlx=warn,hyper=warn,h2=warn".into()));
    let mut server = ServerProcess::start(&db.url, options).await;
    let client = client();
    for i in 0..300 {
        let email = format!("unread-{i}@example.com");
        let auth = identity(&client, &server.url(), &email).await;
        let (status, _) = trigger_and_wait(
            &client,
            &server.url(),
            &format!("unread-{i}"),
            &registration(&auth, &email),
        )
        .await
        .unwrap_or_else(|e| panic!("registration {i} with the log unread: {e}"));
        assert_eq!(status, "completed", "registration {i}");
    }
    // The log did outgrow the pipe, so the runs above were served with it full: a pipe
    // holds 64 KiB, and at least that much is waiting to be read.
    let mut stderr = server.take_unread_stderr().expect("the unread pipe");
    let filled = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::task::spawn_blocking(move || {
            let mut piled = vec![0u8; 64 * 1024];
            std::io::Read::read_exact(&mut stderr, &mut piled).map(|()| stderr)
        }),
    )
    .await;
    assert!(
        matches!(filled, Ok(Ok(Ok(_)))),
        "the log never filled the pipe, so the test showed nothing: {filled:?}"
    );
    server.kill9();
}
