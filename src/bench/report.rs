//! The benchmark's report: the JSON object of docs/contract.md §7 and a table for people.

use serde::Serialize;
use serde_json::{Value, json};

use super::BenchOptions;
use super::list::ListTimes;
use super::load::{Ceiling, Phase, Recovery};
use super::measure::Latency;

/// Everything one bench run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Runs per closed-loop phase.
    pub runs: usize,
    /// Clients.
    pub concurrency: usize,
    /// Pool size.
    pub pool_size: u32,
    /// Commit lanes of the engine under test.
    pub commit_lanes: usize,
    /// CPUs of this machine.
    pub cpus: usize,
    /// PostgreSQL's version.
    pub postgres: String,
    /// PostgreSQL's own limit: single-row commits per second, and their CPU.
    pub ceiling: Ceiling,
    /// Over HTTP, as fast as it goes.
    pub http: Option<Phase>,
    /// Over HTTP at half that rate.
    pub http_half_load: Option<Phase>,
    /// One client, one run after another.
    pub http_idle: Option<Phase>,
    /// The http phase's batches: (runs committed together, how many such batches).
    pub batch_runs: Vec<(i64, i64)>,
    /// Runs per cohort in the http phase: (runs, cohorts of that size).
    pub cohort_runs: Vec<(i64, i64)>,
    /// A defined saga of HTTP steps, over HTTP, as fast as it goes.
    pub http_steps: Option<Phase>,
    /// Through the library.
    pub library: Option<Phase>,
    /// The registration's shape through the library, with steps that do nothing.
    pub engine_alone: Option<Phase>,
    /// The registration's own SQL, one transaction each, no orchestrator.
    pub sql_alone: Option<Phase>,
    /// The same SQL in its set-based form, several registrations per statement and commit.
    pub sql_set_based: Option<Phase>,
    /// SIGKILL and restart.
    pub recovery: Option<Recovery>,
    /// The server's peak resident set, MiB.
    pub rss_mb: f64,
    /// The runs-list query.
    pub list: Vec<ListTimes>,
}

impl Report {
    /// An empty report for these options.
    pub fn new(options: &BenchOptions) -> Self {
        Self {
            runs: options.runs,
            concurrency: options.concurrency,
            pool_size: options.pool_size,
            commit_lanes: options.commit_lanes,
            cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            postgres: String::new(),
            ceiling: Ceiling {
                commits_per_s: f64::NAN,
                postgres_cpu_ms: None,
                client_cpu_ms: None,
            },
            http: None,
            http_half_load: None,
            http_idle: None,
            batch_runs: Vec::new(),
            cohort_runs: Vec::new(),
            http_steps: None,
            library: None,
            engine_alone: None,
            sql_alone: None,
            sql_set_based: None,
            recovery: None,
            rss_mb: f64::NAN,
            list: Vec::new(),
        }
    }

    /// The JSON object of docs/contract.md §7 (with more detail beside the required keys).
    pub fn json(&self) -> Value {
        let http = self.http.as_ref();
        let half = self.http_half_load.as_ref();
        let latency = half.map(|p| p.latency_ms);
        json!({
            "ceiling_commits_per_s": round(self.ceiling.commits_per_s),
            "runs_per_s": http.map(|p| round(p.runs_per_s)),
            "steps_per_s": http.map(|p| round(p.steps_per_s)),
            "commits_per_run": http.map(|p| round(p.commits_per_run)),
            "statements_per_run": http.and_then(|p| p.statements_per_run).map(round),
            "idle_latency_ms": self.http_idle.as_ref().map(|p| p.latency_ms),
            "batch_runs": self.batch_runs.iter().map(|(runs, batches)| json!({"runs": runs, "batches": batches})).collect::<Vec<_>>(),
            "mean_batch_runs": mean_count(&self.batch_runs).map(round),
            "cohort_runs": self.cohort_runs.iter().map(|(runs, cohorts)| json!({"runs": runs, "cohorts": cohorts})).collect::<Vec<_>>(),
            "mean_cohort_runs": mean_count(&self.cohort_runs).map(round),
            "ratio": http.map(|p| round(p.steps_per_s / self.ceiling.commits_per_s)),
            "latency_ms": latency.map(|l| json!({"p50": round(l.p50), "p90": round(l.p90), "p99": round(l.p99)})),
            "recovery_s": self.recovery.as_ref().map(|r| round(r.recovery_s)),
            "rss_mb": round(self.rss_mb),
            "latency_ms_at_max_throughput": http.map(|p| p.latency_ms),
            "half_load_runs_per_s": half.map(|p| round(p.runs_per_s)),
            "server_cpu_s": http.and_then(|p| p.server_cpu_s).map(round),
            "postgres_cpu_s": http.and_then(|p| p.postgres_cpu_s).map(round),
            "client_cpu_s": http.and_then(|p| p.client_cpu_s).map(round),
            "ceiling_postgres_cpu_ms_per_commit": self.ceiling.postgres_cpu_ms.map(round3),
            "ceiling_client_cpu_ms_per_commit": self.ceiling.client_cpu_ms.map(round3),
            "ratio_if_cpu_bound": http.and_then(|p| self.ratio_if_cpu_bound(p)).map(round),
            "cores_busy": http.and_then(|p| self.cores_busy(p)).map(round),
            "ceiling_cores_busy": self.ceiling_cores_busy().map(round),
            "http_steps": self.http_steps.as_ref().map(|p| json!({
                "runs_per_s": round(p.runs_per_s),
                "steps_per_s": round(p.steps_per_s),
                "ratio": round(p.steps_per_s / self.ceiling.commits_per_s),
                "commits_per_run": round(p.commits_per_run),
                "statements_per_run": p.statements_per_run.map(round),
                "latency_ms": p.latency_ms,
                "server_cpu_s": p.server_cpu_s.map(round),
                "postgres_cpu_s": p.postgres_cpu_s.map(round),
            })),
            "library": self.library,
            "library_ratio_if_cpu_bound": self.library.as_ref().and_then(|p| self.ratio_if_cpu_bound(p)).map(round),
            "library_cores_busy": self.library.as_ref().and_then(|p| self.cores_busy(p)).map(round),
            "engine_alone": self.engine_alone.as_ref().map(|p| self.in_process_json(p)),
            "sql_alone": self.sql_alone.as_ref().map(|p| self.in_process_json(p)),
            "sql_set_based": self.sql_set_based.as_ref().map(|p| self.in_process_json(p)),
            "recovery": self.recovery,
            "list_ms": self.list,
            "runs": self.runs,
            "concurrency": self.concurrency,
            "pool_size": self.pool_size,
            "commit_lanes": self.commit_lanes,
            "cpus": self.cpus,
            "postgres": self.postgres,
        })
    }

    /// What the ratio would be if both the ceiling and `phase` were bound by this machine's
    /// CPU alone: the steps of a run, times the CPU of a ceiling commit (PostgreSQL's and
    /// its writer's), over the CPU of a run (PostgreSQL's, the server's and its client's; a
    /// phase in the bench's own process has no server). When the measured ratio is close to
    /// it, CPU per run is what sets the ratio, and a ratio of 0.7 needs a run to cost no more
    /// than steps ÷ 0.7 ceiling commits.
    pub fn ratio_if_cpu_bound(&self, phase: &Phase) -> Option<f64> {
        let commit = self.ceiling.postgres_cpu_ms? + self.ceiling.client_cpu_ms?;
        let run = cpu_s(phase)? * 1000.0 / phase.runs as f64;
        (run > 0.0).then(|| phase.steps_per_run * commit / run)
    }

    /// How many of the machine's cores `phase` kept busy on average: its CPU over its time
    /// (runs ÷ runs/s). Beside [`Report::ratio_if_cpu_bound`] it says whether the phase was
    /// held back by the CPU at all: with 2 CPUs, 2 is all there is, and a phase well under it
    /// waited for something else.
    pub fn cores_busy(&self, phase: &Phase) -> Option<f64> {
        if phase.runs == 0 || phase.runs_per_s <= 0.0 {
            return None;
        }
        Some(cpu_s(phase)? * phase.runs_per_s / phase.runs as f64)
    }

    /// How many cores the ceiling's commits kept busy: commits/s times a commit's CPU.
    pub fn ceiling_cores_busy(&self) -> Option<f64> {
        let commit_ms = self.ceiling.postgres_cpu_ms? + self.ceiling.client_cpu_ms?;
        Some(self.ceiling.commits_per_s * commit_ms / 1000.0)
    }

    /// A phase in the bench's own process (the engine alone, the SQL by hand), as JSON.
    fn in_process_json(&self, p: &Phase) -> Value {
        json!({
            "runs_per_s": round(p.runs_per_s),
            "steps_per_s": round(p.steps_per_s),
            "ratio": round(p.steps_per_s / self.ceiling.commits_per_s),
            "ratio_if_cpu_bound": self.ratio_if_cpu_bound(p).map(round),
            "cores_busy": self.cores_busy(p).map(round),
            "commits_per_run": round(p.commits_per_run),
            "statements_per_run": p.statements_per_run.map(round),
            "latency_ms": p.latency_ms,
            "postgres_cpu_s": p.postgres_cpu_s.map(round),
            "client_cpu_s": p.client_cpu_s.map(round),
        })
    }

    /// A phase in the bench's own process, as the table's lines: the first under `title`, the
    /// others under its name (the title up to its parenthesis).
    fn in_process_lines(&self, title: &str, p: &Phase, line: &mut impl FnMut(&str, String)) {
        let name = title.split(" (").next().unwrap_or(title);
        line(
            &format!("{title}: runs/s (ratio)"),
            format!(
                "{:.0} ({:.2})",
                p.runs_per_s,
                p.steps_per_s / self.ceiling.commits_per_s
            ),
        );
        if let Some(statements) = p.statements_per_run {
            line(
                &format!("{name}: commits / statements per run"),
                format!("{:.2} / {statements:.2}", p.commits_per_run),
            );
        }
        if let (Some(postgres), Some(clients)) = (p.postgres_cpu_s, p.client_cpu_s) {
            let per_run = |s: f64| s * 1000.0 / p.runs as f64;
            line(
                &format!("{name}: CPU ms per run (PostgreSQL / clients)"),
                format!("{:.2} / {:.2}", per_run(postgres), per_run(clients)),
            );
        }
        if let Some(bound) = self.ratio_if_cpu_bound(p) {
            line(&format!("{name}: ratio if CPU-bound"), format!("{bound:.2}"));
        }
        if let Some(cores) = self.cores_busy(p) {
            line(&format!("{name}: cores busy"), format!("{cores:.2} of {}", self.cpus));
        }
        line(&format!("{name}: latency p50/p90/p99 ms"), fmt_latency(&p.latency_ms));
    }

    /// The table for people.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let mut line = |k: &str, v: String| out.push_str(&format!("  {k:<44} {v}\n"));
        line("machine", format!("{} CPUs, PostgreSQL {}", self.cpus, self.postgres));
        line(
            "runs per phase / clients / pool / lanes",
            format!(
                "{} / {} / {} / {}",
                self.runs, self.concurrency, self.pool_size, self.commit_lanes
            ),
        );
        line(
            "ceiling: single-row commits/s",
            format!("{:.0}", self.ceiling.commits_per_s),
        );
        if let (Some(postgres), Some(writers)) = (self.ceiling.postgres_cpu_ms, self.ceiling.client_cpu_ms) {
            line(
                "ceiling: CPU ms per commit (PostgreSQL / writers)",
                format!("{postgres:.3} / {writers:.3}"),
            );
        }
        if let Some(cores) = self.ceiling_cores_busy() {
            line("ceiling: cores busy", format!("{cores:.2} of {}", self.cpus));
        }
        if let Some(p) = &self.http {
            line("http: runs/s (max)", format!("{:.0}", p.runs_per_s));
            line("http: steps/s", format!("{:.0}", p.steps_per_s));
            line(
                "ratio = steps/s / ceiling commits/s",
                format!("{:.2}", p.steps_per_s / self.ceiling.commits_per_s),
            );
            line(
                "http: commits per run (per step)",
                format!("{:.2} ({:.2})", p.commits_per_run, p.commits_per_run / p.steps_per_run),
            );
            if let Some(statements) = p.statements_per_run {
                line("http: statements (round trips) per run", format!("{statements:.2}"));
            }
            if let Some(mean) = mean_count(&self.batch_runs) {
                let spread: Vec<String> = self.batch_runs.iter().map(|(runs, n)| format!("{runs}:{n}")).collect();
                line(
                    "http: runs per lane commit, mean (runs:batches)",
                    format!("{mean:.2} ({})", spread.join(" ")),
                );
            }
            if let Some(mean) = mean_count(&self.cohort_runs) {
                let spread: Vec<String> = self.cohort_runs.iter().map(|(runs, n)| format!("{runs}:{n}")).collect();
                line(
                    "http: runs per cohort, mean (runs:cohorts)",
                    format!("{mean:.2} ({})", spread.join(" ")),
                );
            }
            line("http: latency at max p50/p90/p99 ms", fmt_latency(&p.latency_ms));
            if let Some(cpu) = p.server_cpu_s {
                line(
                    "http: server CPU s (per 1000 runs)",
                    format!("{cpu:.2} ({:.2})", cpu * 1000.0 / p.runs as f64),
                );
            }
            if let (Some(postgres), Some(server), Some(clients)) = (p.postgres_cpu_s, p.server_cpu_s, p.client_cpu_s) {
                let per_run = |s: f64| s * 1000.0 / p.runs as f64;
                line(
                    "http: CPU ms per run (PostgreSQL / server / clients)",
                    format!(
                        "{:.2} / {:.2} / {:.2}",
                        per_run(postgres),
                        per_run(server),
                        per_run(clients)
                    ),
                );
            }
            if let Some(bound) = self.ratio_if_cpu_bound(p) {
                line("http: ratio if CPU-bound", format!("{bound:.2}"));
            }
            if let Some(cores) = self.cores_busy(p) {
                line("http: cores busy", format!("{cores:.2} of {}", self.cpus));
            }
        }
        if let Some(p) = &self.http_idle {
            line("idle (one client): p50/p90/p99 ms", fmt_latency(&p.latency_ms));
        }
        if let Some(p) = &self.http_half_load {
            line(
                &format!("http at half load ({:.0} runs/s): p50/p90/p99 ms", p.runs_per_s),
                fmt_latency(&p.latency_ms),
            );
        }
        if let Some(p) = &self.http_steps {
            line("http steps: runs/s (3 HTTP steps each)", format!("{:.0}", p.runs_per_s));
            line(
                "http steps: steps/s (ratio)",
                format!(
                    "{:.0} ({:.2})",
                    p.steps_per_s,
                    p.steps_per_s / self.ceiling.commits_per_s
                ),
            );
            line(
                "http steps: commits per run (per step)",
                format!("{:.2} ({:.2})", p.commits_per_run, p.commits_per_run / p.steps_per_run),
            );
            if let Some(statements) = p.statements_per_run {
                line(
                    "http steps: statements (round trips) per run",
                    format!("{statements:.2}"),
                );
            }
            line("http steps: latency p50/p90/p99 ms", fmt_latency(&p.latency_ms));
            if let Some(cpu) = p.postgres_cpu_s {
                line(
                    "http steps: PostgreSQL CPU s (per 1000 runs)",
                    format!("{cpu:.2} ({:.2})", cpu * 1000.0 / p.runs as f64),
                );
            }
        }
        line("server peak RSS MiB", format!("{:.1}", self.rss_mb));
        if let Some(p) = &self.library {
            line("library: runs/s", format!("{:.0}", p.runs_per_s));
            line("library: commits per run", format!("{:.2}", p.commits_per_run));
            line("library: latency p50/p90/p99 ms", fmt_latency(&p.latency_ms));
            if let Some(bound) = self.ratio_if_cpu_bound(p) {
                line("library: ratio if CPU-bound", format!("{bound:.2}"));
            }
            if let Some(cores) = self.cores_busy(p) {
                line("library: cores busy", format!("{cores:.2} of {}", self.cpus));
            }
        }
        let in_process = [
            ("engine alone (steps that do nothing)", &self.engine_alone),
            ("SQL alone (no orchestrator)", &self.sql_alone),
            ("SQL set-based (no orchestrator)", &self.sql_set_based),
        ];
        for (title, phase) in in_process {
            if let Some(p) = phase {
                self.in_process_lines(title, p, &mut line);
            }
        }
        if let Some(r) = &self.recovery {
            line(
                "recovery_s (restart -> all terminal)",
                format!(
                    "{:.2} ({} runs unfinished; listening after {:.2} s, all taken over after {:.2} s)",
                    r.recovery_s, r.runs_in_flight, r.restart_s, r.takeover_s
                ),
            );
        }
        for l in &self.list {
            line(
                &format!("runs list, {} runs: newest page ms", l.rows),
                format!("{:.2}", l.newest_ms),
            );
            line(
                &format!("runs list, {} runs: by status ms", l.rows),
                format!("{:.2}", l.by_status_ms),
            );
            line(
                &format!("runs list, {} runs: workflow+status ms", l.rows),
                format!("{:.2}", l.by_workflow_status_ms),
            );
            line(
                &format!("runs list, {} runs: search by email ms", l.rows),
                format!("{:.2}", l.by_email_ms),
            );
            line(
                &format!("runs list, {} runs: deep page ms", l.rows),
                format!("{:.2}", l.deep_page_ms),
            );
            line(
                &format!("runs list, {} runs: counts by status ms", l.rows),
                format!("{:.2}", l.counts_ms),
            );
            if let Some(vacuumed) = l.counts_vacuumed_ms {
                line(
                    &format!("runs list, {} runs: counts, vacuumed ms", l.rows),
                    format!("{vacuumed:.2}"),
                );
            }
            line(
                &format!("retention sweep, {} runs: 500 deleted ms", l.rows),
                format!("{:.2}", l.sweep_ms),
            );
        }
        out
    }
}

/// The CPU seconds a phase cost the machine: PostgreSQL's, the server's and its clients'
/// (a phase in the bench's own process has no server); `None` when a figure is missing.
fn cpu_s(phase: &Phase) -> Option<f64> {
    let server = if phase.in_process { 0.0 } else { phase.server_cpu_s? };
    Some(phase.postgres_cpu_s? + server + phase.client_cpu_s?)
}

fn fmt_latency(l: &Latency) -> String {
    format!("{:.1} / {:.1} / {:.1}", l.p50, l.p90, l.p99)
}

fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// The mean of a count histogram's counts ((count, times counted) pairs), if anything was
/// counted: e.g. runs per batch.
fn mean_count(histogram: &[(i64, i64)]) -> Option<f64> {
    let times: i64 = histogram.iter().map(|(_, n)| n).sum();
    let total: i64 = histogram.iter().map(|(c, n)| c * n).sum();
    (times > 0).then(|| total as f64 / times as f64)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn report() -> Report {
        Report::new(&BenchOptions {
            runs: 1000,
            concurrency: 16,
            pool_size: 32,
            commit_lanes: 8,
            database_url: None,
            list_rows: Vec::new(),
            phase: Duration::from_secs(1),
        })
    }

    fn phase(postgres: Option<f64>, server: Option<f64>, clients: Option<f64>) -> Phase {
        let mut samples = vec![Duration::from_millis(1)];
        Phase {
            runs: 1000,
            runs_per_s: 400.0,
            steps_per_s: 2000.0,
            steps_per_run: 5.0,
            commits_per_run: 1.3,
            statements_per_run: None,
            latency_ms: Latency::of(&mut samples),
            server_cpu_s: server,
            client_cpu_s: clients,
            postgres_cpu_s: postgres,
            in_process: false,
        }
    }

    #[test]
    fn the_cpu_bound_ratio_is_a_runs_steps_worth_of_ceiling_commits_over_its_cpu() {
        let mut report = report();
        // A commit costs 0.1 + 0.05 ms; a run 3 + 1 + 0.5 ms: 5 steps × 0.15 / 4.5.
        report.ceiling.postgres_cpu_ms = Some(0.1);
        report.ceiling.client_cpu_ms = Some(0.05);
        let bound = report.ratio_if_cpu_bound(&phase(Some(3.0), Some(1.0), Some(0.5)));
        assert!(bound.is_some_and(|b| (b - 5.0 * 0.15 / 4.5).abs() < 1e-9), "{bound:?}");
        // Any figure missing (a remote database, a process gone): no bound.
        assert_eq!(report.ratio_if_cpu_bound(&phase(None, Some(1.0), Some(0.5))), None);
        // A phase in the bench's process has no server: its clients' CPU is the rest.
        let in_process = Phase {
            in_process: true,
            ..phase(Some(3.0), None, Some(1.5))
        };
        let bound = report.ratio_if_cpu_bound(&in_process);
        assert!(bound.is_some_and(|b| (b - 5.0 * 0.15 / 4.5).abs() < 1e-9), "{bound:?}");
        assert_eq!(
            report.ratio_if_cpu_bound(&Phase {
                in_process: true,
                ..phase(Some(3.0), None, None)
            }),
            None
        );
        report.ceiling.client_cpu_ms = None;
        assert_eq!(report.ratio_if_cpu_bound(&phase(Some(3.0), Some(1.0), Some(0.5))), None);
    }

    #[test]
    fn cores_busy_is_a_phases_cpu_over_its_time() {
        let mut report = report();
        // 1000 runs at 400/s take 2.5 s; they cost 3 + 1 + 0.5 s of CPU: 1.8 cores.
        let busy = report.cores_busy(&phase(Some(3.0), Some(1.0), Some(0.5)));
        assert!(busy.is_some_and(|b| (b - 1.8).abs() < 1e-9), "{busy:?}");
        // In the bench's process, no server: 3 + 1.5 s over 2.5 s.
        let in_process = Phase {
            in_process: true,
            ..phase(Some(3.0), None, Some(1.5))
        };
        let busy = report.cores_busy(&in_process);
        assert!(busy.is_some_and(|b| (b - 1.8).abs() < 1e-9), "{busy:?}");
        assert_eq!(report.cores_busy(&phase(Some(3.0), None, Some(0.5))), None);
        assert_eq!(
            report.cores_busy(&Phase {
                runs_per_s: 0.0,
                ..phase(Some(3.0), Some(1.0), Some(0.5))
            }),
            None
        );
        // The ceiling: 10,000 commits/s at 0.1 + 0.05 ms each.
        report.ceiling.commits_per_s = 10_000.0;
        report.ceiling.postgres_cpu_ms = Some(0.1);
        report.ceiling.client_cpu_ms = Some(0.05);
        let busy = report.ceiling_cores_busy();
        assert!(busy.is_some_and(|b| (b - 1.5).abs() < 1e-9), "{busy:?}");
        report.ceiling.postgres_cpu_ms = None;
        assert_eq!(report.ceiling_cores_busy(), None);
    }
}
