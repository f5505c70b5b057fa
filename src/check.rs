//! The invariant checker: SQL over the whole database that reports every violation of
//! docs/contract.md §6, each with the run it concerns. The crash tests end with it; operators can
//! run it on a live database with `sagaflow check`.
//!
//! It reads engine tables and the customer domain's tables together, so its SQL lives here,
//! apart from both components' stores.

use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use crate::engine::Engine;

/// One broken invariant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Violation {
    /// Which rule.
    pub rule: &'static str,
    /// The run concerned, if one is.
    pub run_id: Option<Uuid>,
    /// What was found.
    pub detail: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.run_id {
            Some(run) => write!(f, "[{}] run {run}: {}", self.rule, self.detail),
            None => write!(f, "[{}] {}", self.rule, self.detail),
        }
    }
}

/// A rule: its name and a query returning `(run_id, detail)` for each violation.
struct Rule {
    name: &'static str,
    sql: &'static str,
}

const RULES: &[Rule] = &[
    Rule {
        name: "log-gap-free",
        // Sequence numbers 1..n, n = the run's log_seq, no duplicates, times never go back.
        sql: "SELECT r.id, format('log has %s entries, seq %s..%s, run.log_seq %s',
                                  count(e.seq), min(e.seq), max(e.seq), r.log_seq)
              FROM runs r LEFT JOIN run_events e ON e.run_id = r.id
              GROUP BY r.id, r.log_seq
              HAVING count(e.seq) <> r.log_seq OR coalesce(max(e.seq), 0) <> r.log_seq
                  OR coalesce(min(e.seq), 1) <> 1 OR count(DISTINCT e.seq) <> count(e.seq)
              UNION ALL
              SELECT e.run_id, format('entry %s is dated before entry %s', e.seq, e.prev_seq)
              FROM (SELECT run_id, seq, at, lag(at) OVER w AS prev_at, lag(seq) OVER w AS prev_seq
                    FROM run_events WINDOW w AS (PARTITION BY run_id ORDER BY seq)) e
              WHERE e.at < e.prev_at",
    },
    Rule {
        name: "no-orphans",
        // Steps and log entries belong to a run that exists (no foreign keys enforce it).
        sql: "SELECT s.run_id, format('%s step rows of a missing run', count(*))
              FROM run_steps s WHERE NOT EXISTS (SELECT 1 FROM runs r WHERE r.id = s.run_id) GROUP BY s.run_id
              UNION ALL
              SELECT e.run_id, format('%s log entries of a missing run', count(*))
              FROM run_events e WHERE NOT EXISTS (SELECT 1 FROM runs r WHERE r.id = e.run_id) GROUP BY e.run_id",
    },
    Rule {
        name: "one-success-per-step",
        sql: "SELECT run_id, format('step %s succeeded %s times', step, count(*))
              FROM run_events WHERE kind = 'step_succeeded'
              GROUP BY run_id, step HAVING count(*) > 1",
    },
    Rule {
        name: "compensation-only-after-success",
        // A compensation starts only for a step that succeeded earlier in the log, or whose
        // failed attempt recorded partial work.
        sql: "SELECT c.run_id, format('step %s compensated (seq %s) without a success or partial work before',
                                      c.step, c.seq)
              FROM run_events c
              WHERE c.kind = 'step_compensation_started'
                AND NOT EXISTS (SELECT 1 FROM run_events s
                                WHERE s.run_id = c.run_id AND s.step = c.step AND s.seq < c.seq
                                  AND (s.kind = 'step_succeeded'
                                       OR (s.kind = 'step_failed' AND s.detail ? 'partial')))",
    },
    Rule {
        name: "unfinished-runs-have-their-version",
        // Every instance runs every registered version (built-in plans are recorded at start,
        // defined ones when stored); an unfinished run of a version nobody has, or of a
        // defined version whose definition is gone, is never going to finish.
        sql: "SELECT r.id, format('unfinished run of %s@%s, a version no instance registered', r.workflow, r.workflow_version)
              FROM runs r
              WHERE run_status_is_unfinished(r.status)
                AND NOT EXISTS (SELECT 1 FROM workflow_plans p
                                WHERE p.workflow = r.workflow AND p.version = r.workflow_version)
              UNION ALL
              SELECT r.id, format('unfinished run of %s@%s, whose definition was deleted', r.workflow, r.workflow_version)
              FROM runs r JOIN workflow_plans p ON p.workflow = r.workflow AND p.version = r.workflow_version
              WHERE run_status_is_unfinished(r.status) AND p.defined
                AND NOT EXISTS (SELECT 1 FROM workflow_definitions d
                                WHERE d.name = r.workflow AND d.version = r.workflow_version)",
    },
    Rule {
        name: "compensable-steps-undone",
        // Defined workflows, from their stored plan (built-in ones are checked against the
        // engine's plans in `uncompensated_steps`).
        sql: "SELECT r.id, format('%s run left step %s succeeded; it has a compensation', r.status, s.name)
              FROM runs r JOIN run_steps s ON s.run_id = r.id
              JOIN workflow_definitions d ON d.name = r.workflow AND d.version = r.workflow_version
              WHERE r.status IN ('compensated', 'cancelled') AND s.status = 'succeeded'
                AND EXISTS (SELECT 1 FROM jsonb_array_elements(d.definition->'steps') st
                            WHERE st->>'name' = s.name AND st ? 'compensate')",
    },
    Rule {
        name: "terminal-steps-consistent",
        sql: "SELECT r.id, format('%s run has step %s %s', r.status, s.name, s.status)
              FROM runs r JOIN run_steps s ON s.run_id = r.id
              WHERE (r.status = 'completed' AND s.status NOT IN ('succeeded', 'skipped'))
                 OR (r.status IN ('compensated', 'cancelled', 'failed')
                     AND s.status IN ('running', 'compensating'))
                 OR (r.status IN ('compensated', 'cancelled') AND s.status = 'compensation_failed')
              UNION ALL
              SELECT r.id, 'failed run without a compensation that gave up'
              FROM runs r WHERE r.status = 'failed'
                AND NOT EXISTS (SELECT 1 FROM run_steps s WHERE s.run_id = r.id AND s.status = 'compensation_failed')
              UNION ALL
              SELECT r.id, format('%s run whose log does not end with its outcome (%s)', r.status, e.kind)
              FROM runs r JOIN run_events e ON e.run_id = r.id AND e.seq = r.log_seq
              WHERE run_status_is_terminal(r.status)
                AND e.kind::text <> 'run_' || r.status::text AND e.kind NOT IN ('operator_retry', 'operator_restart')",
    },
    Rule {
        name: "paused-runs-are-held",
        // A paused run holds no lease and is not due, its log's last word on pausing is
        // `run_paused` (a resume, a cancel or a later entry would have moved it), and a run
        // held by its workflow is pending on a workflow that is paused.
        sql: "SELECT r.id, format('paused run %s', CASE WHEN r.lease_owner IS NOT NULL THEN 'holds a lease'
                                                      ELSE 'is due' END)
              FROM runs r WHERE r.status = 'paused' AND (r.lease_owner IS NOT NULL OR r.ready_at IS NOT NULL)
              UNION ALL
              SELECT r.id, format('paused run whose last pause entry is %s', e.kind)
              FROM runs r
              CROSS JOIN LATERAL (SELECT kind FROM run_events e
                                  WHERE e.run_id = r.id AND e.kind IN ('run_paused', 'run_resumed', 'cancel_requested')
                                  ORDER BY seq DESC LIMIT 1) e
              WHERE r.status = 'paused' AND e.kind <> 'run_paused'
              UNION ALL
              SELECT r.id, format('held run of %s, which is not paused', r.workflow)
              FROM runs r WHERE r.held
                AND NOT EXISTS (SELECT 1 FROM paused_workflows p WHERE p.workflow = r.workflow)",
    },
    Rule {
        name: "wait-has-deadline",
        // A waiting run is running (or paused from running), names its deadline, and is due
        // by it (or leased, or paused: then it is looked at when resumed); its waiting step is
        // running at the attempt the wait names; every wait logged a deadline.
        sql: "SELECT r.id, format('waits for %s %s but is %s', r.wait_kind, r.wait_name, r.status)
              FROM runs r WHERE r.wait_kind IS NOT NULL
                AND (r.wait_deadline IS NULL
                     OR NOT (r.status = 'running' OR (r.status = 'paused' AND r.paused_from = 'running')))
              UNION ALL
              SELECT r.id, format('waits for %s %s until %s, but is due at %s', r.wait_kind, r.wait_name,
                                  r.wait_deadline, coalesce(r.ready_at::text, 'no time'))
              FROM runs r WHERE r.wait_kind IS NOT NULL AND r.lease_owner IS NULL AND r.status <> 'paused'
                AND (r.ready_at IS NULL OR r.ready_at > r.wait_deadline)
              UNION ALL
              SELECT r.id, format('waits at step %s attempt %s, but the step is %s at attempt %s',
                                  s.name, r.wait_attempt, s.status, s.attempts)
              FROM runs r JOIN run_steps s ON s.run_id = r.id AND s.idx = r.wait_step
              WHERE r.wait_kind IS NOT NULL AND (s.status <> 'running' OR s.attempts <> r.wait_attempt)
              UNION ALL
              SELECT e.run_id, format('step %s began waiting (seq %s) without a deadline', e.step, e.seq)
              FROM run_events e WHERE e.kind = 'step_waiting' AND (e.detail->>'deadline') IS NULL",
    },
    Rule {
        name: "signal-consumed-once",
        // Each delivery (a signal or a completion) is consumed by at most one wait, and it is
        // marked consumed exactly when the log says a wait consumed it.
        sql: "SELECT e.run_id, format('inbox entry %s was consumed %s times', e.detail->>'inbox_id', count(*))
              FROM run_events e WHERE e.kind IN ('signal_received', 'step_completed_externally')
              GROUP BY e.run_id, e.detail->>'inbox_id' HAVING count(*) > 1
              UNION ALL
              SELECT i.run_id, format('inbox entry %s is marked consumed by %s, but no log entry consumed it',
                                      i.id, i.consumed_by)
              FROM run_inbox i WHERE i.consumed_at IS NOT NULL
                AND NOT EXISTS (SELECT 1 FROM run_events e
                                WHERE e.run_id = i.run_id AND e.kind IN ('signal_received', 'step_completed_externally')
                                  AND e.detail->>'inbox_id' = i.id::text)
              UNION ALL
              SELECT e.run_id, format('log entry %s consumed inbox entry %s, which is not marked consumed',
                                      e.seq, e.detail->>'inbox_id')
              FROM run_events e WHERE e.kind IN ('signal_received', 'step_completed_externally')
                AND NOT EXISTS (SELECT 1 FROM run_inbox i
                                WHERE i.run_id = e.run_id AND i.id::text = e.detail->>'inbox_id'
                                  AND i.consumed_at IS NOT NULL)
              UNION ALL
              SELECT i.run_id, format('%s inbox entries of a missing run', count(*))
              FROM run_inbox i WHERE NOT EXISTS (SELECT 1 FROM runs r WHERE r.id = i.run_id) GROUP BY i.run_id",
    },
    Rule {
        name: "completion-for-current-attempt",
        // A completion is accepted only for the attempt that was waiting: its inbox entry
        // names the attempt that logged the wait, and no newer attempt started in between.
        sql: "SELECT e.run_id, format('step %s was completed (seq %s) for attempt %s, logged as attempt %s',
                                      e.step, e.seq, i.attempt, e.attempt)
              FROM run_events e JOIN run_inbox i ON i.run_id = e.run_id AND i.id::text = e.detail->>'inbox_id'
              WHERE e.kind = 'step_completed_externally' AND i.attempt IS DISTINCT FROM e.attempt
              UNION ALL
              SELECT e.run_id, format('step %s was completed (seq %s) for attempt %s, which was not the one waiting',
                                      e.step, e.seq, e.attempt)
              FROM run_events e
              WHERE e.kind = 'step_completed_externally'
                AND NOT EXISTS (SELECT 1 FROM run_events w
                                WHERE w.run_id = e.run_id AND w.step = e.step AND w.kind = 'step_waiting'
                                  AND w.attempt = e.attempt AND w.seq < e.seq
                                  AND NOT EXISTS (SELECT 1 FROM run_events n
                                                  WHERE n.run_id = e.run_id AND n.step = e.step
                                                    AND n.kind = 'step_started' AND n.seq > w.seq AND n.seq < e.seq))",
    },
    Rule {
        name: "outbox-released-exactly-for-completed",
        sql: "SELECT r.id, format('%s run with %s released and %s held events', r.status,
                                  count(*) FILTER (WHERE o.status = 'released'),
                                  count(*) FILTER (WHERE o.status = 'held'))
              FROM runs r LEFT JOIN outbox_events o ON o.run_id = r.id
              WHERE run_status_is_terminal(r.status)
                AND r.workflow = 'create-customer-account'
              GROUP BY r.id, r.status
              HAVING (r.status = 'completed') <> (count(*) FILTER (WHERE o.status = 'released') = 1)
                  OR count(*) FILTER (WHERE o.status = 'held') > 0
                  OR count(*) FILTER (WHERE o.status = 'released') > 1",
    },
    Rule {
        name: "completed-registration-has-its-customer",
        // Exactly one account customer created by the run (or, for a run restarted after
        // `create-customers`, by the run whose step it reused), and the identity points at it.
        sql: "WITH reg AS (
                  SELECT r.*, coalesce((SELECT (e.detail->>'reused_from')::uuid FROM run_events e
                                        WHERE e.run_id = r.id AND e.kind = 'step_succeeded'
                                          AND e.step = 'create-customers' AND e.detail ? 'reused_from'
                                        LIMIT 1), r.id) AS creator
                  FROM runs r WHERE r.workflow = 'create-customer-account' AND r.status = 'completed'
              )
              SELECT r.id, format('%s account customers created; identity %s has customer_id %s (run output %s)',
                                  (SELECT count(*) FROM customers c WHERE c.created_by_run = r.creator AND c.has_account),
                                  r.input->>'authIdentityId', a.app_metadata->>'customer_id', r.output->>'id')
              FROM reg r LEFT JOIN auth_identities a ON a.id = r.input->>'authIdentityId'
              WHERE (SELECT count(*) FROM customers c WHERE c.created_by_run = r.creator AND c.has_account) <> 1
                     OR a.app_metadata->>'customer_id' IS DISTINCT FROM r.output->>'id'
                     OR NOT EXISTS (SELECT 1 FROM customers c WHERE c.id = r.output->>'id' AND c.created_by_run = r.creator)",
    },
    Rule {
        name: "undone-registration-left-nothing",
        // No customer created by the run survives, and no identity points at a customer that
        // no completed run created.
        sql: "SELECT r.id, format('%s run left customer %s', r.status, c.id)
              FROM runs r JOIN customers c ON c.created_by_run = r.id
              WHERE r.workflow = 'create-customer-account' AND r.status IN ('compensated', 'cancelled')
              UNION ALL
              SELECT NULL::uuid, format('identity %s points at customer %s, which no completed registration created',
                                        a.id, a.app_metadata->>'customer_id')
              FROM auth_identities a
              WHERE a.app_metadata ? 'customer_id'
                AND NOT EXISTS (SELECT 1 FROM customers c JOIN runs r ON r.id = c.created_by_run
                                WHERE c.id = a.app_metadata->>'customer_id' AND r.status = 'completed')
                -- ...or that a completed restart of that run reused.
                AND NOT EXISTS (SELECT 1 FROM customers c
                                JOIN run_events e ON e.kind = 'step_succeeded' AND e.step = 'create-customers'
                                                 AND e.detail->>'reused_from' = c.created_by_run::text
                                JOIN runs r ON r.id = e.run_id AND r.status = 'completed'
                                WHERE c.id = a.app_metadata->>'customer_id')",
    },
    Rule {
        name: "one-account-per-email",
        sql: "SELECT NULL::uuid, format('%s account customers with email %s', count(*), email)
              FROM customers WHERE has_account AND deleted_at IS NULL GROUP BY email HAVING count(*) > 1",
    },
];

/// Every violation of the invariants in the database, by rule. `engine` supplies the step
/// plans (which steps can be compensated).
pub async fn violations(pool: &PgPool, engine: &Engine) -> Result<Vec<Violation>, sqlx::Error> {
    let mut found = Vec::new();
    for rule in RULES {
        let rows: Vec<(Option<Uuid>, String)> = sqlx::query_as(rule.sql).fetch_all(pool).await?;
        found.extend(rows.into_iter().map(|(run_id, detail)| Violation {
            rule: rule.name,
            run_id,
            detail,
        }));
    }
    found.extend(uncompensated_steps(pool, engine).await?);
    Ok(found)
}

/// In a compensated or cancelled run, no step that can be compensated is left succeeded.
async fn uncompensated_steps(pool: &PgPool, engine: &Engine) -> Result<Vec<Violation>, sqlx::Error> {
    let rows: Vec<(Uuid, String, i32, String)> = sqlx::query_as(
        "SELECT r.id, r.workflow, r.workflow_version, s.name FROM runs r JOIN run_steps s ON s.run_id = r.id
         WHERE r.status IN ('compensated', 'cancelled') AND s.status = 'succeeded'",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .filter(|(_, workflow, version, step)| {
            engine.workflow_version(workflow, *version).is_some_and(|w| {
                w.source() == crate::engine::Source::Builtin
                    && w.steps().iter().any(|s| s.name() == step && s.has_compensation())
            })
        })
        .map(|(run, _, _, step)| Violation {
            rule: "compensable-steps-undone",
            run_id: Some(run),
            detail: format!("step {step} can be compensated but is still succeeded"),
        })
        .collect())
}

/// Runs that are not terminal (for checks after "every run had time to finish").
pub async fn unfinished_runs(pool: &PgPool) -> Result<Vec<(Uuid, String)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, status::text FROM runs WHERE run_status_is_unfinished(status)
         ORDER BY created_at",
    )
    .fetch_all(pool)
    .await
}
