//! The runs-list query the API and the dashboard use (`Engine::list_runs`), timed on a
//! table of synthetic finished runs of a realistic mix.

use std::time::{Duration, Instant};

use anyhow::Result;
use sagaflow::engine::RunStatus;
use sagaflow::engine::read::RunReads;
use sagaflow::engine::{Cursor, Engine, EngineError, RunFilter};
use serde::Serialize;
use sqlx::PgPool;

/// Median times of the list queries at one table size, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct ListTimes {
    /// Runs in the table.
    pub rows: usize,
    /// The first page, newest first, no filter.
    pub newest_ms: f64,
    /// The first page of `failed` runs.
    pub by_status_ms: f64,
    /// The first page of one workflow's `compensated` runs.
    pub by_workflow_status_ms: f64,
    /// Search by a customer's email.
    pub by_email_ms: f64,
    /// A page half way down the table (keyset cursor).
    pub deep_page_ms: f64,
    /// Counts by status over the last 24 hours, each stopping at 10,000 (what the dashboard
    /// shows), on the table as written: not yet vacuumed, as a busy table's recent pages are.
    pub counts_ms: f64,
    /// The same counts once the table is vacuumed (its pages all-visible); at the largest
    /// size only, since vacuuming a smaller one would vacuum the larger one's last day too
    /// (each fill adds older runs).
    pub counts_vacuumed_ms: Option<f64>,
    /// One batch of the retention sweep (the oldest 500 finished runs deleted, as the
    /// `retention-sweep` workflow does), through a worker's pool: generic plans.
    pub sweep_ms: f64,
}

const PAGE: i64 = 51;

/// Fills the table up to each size in turn and times the queries.
pub async fn measure(pool: &PgPool, url: &str, sizes: &[usize]) -> Result<Vec<ListTimes>> {
    let pools = sagaflow::pg::Pools::split(url, &sagaflow::pg::PoolConfig::default())?;
    let sweeper = Engine::builder(pools.api.clone())
        .worker_pool(pools.worker.clone())
        .build()?;
    let mut times = Vec::new();
    let mut filled = 0;
    // Whether autovacuum has reached the table when a size is timed would otherwise be luck:
    // each size is timed as written, and the counts of the largest again once vacuumed.
    sqlx::raw_sql("ALTER TABLE runs SET (autovacuum_enabled = off)")
        .execute(pool)
        .await?;
    let largest = sizes.iter().copied().max();
    for &rows in sizes {
        if rows > filled {
            fill(pool, filled, rows).await?;
            filled = rows;
        }
        sqlx::raw_sql("ANALYZE runs").execute(pool).await?;
        let email = format!("user{}@example.com", rows / 3);
        let middle: (chrono::DateTime<chrono::Utc>, uuid::Uuid) =
            sqlx::query_as("SELECT created_at, id FROM runs ORDER BY created_at DESC, id DESC OFFSET $1 LIMIT 1")
                .bind((rows / 2) as i64)
                .fetch_one(pool)
                .await?;
        let cursor = Cursor {
            created_at: middle.0,
            id: middle.1,
        };
        let all = RunFilter::default();
        let failed = RunFilter {
            statuses: vec![RunStatus::Failed],
            ..RunFilter::default()
        };
        let compensated = RunFilter {
            workflow: Some("create-customer-account".into()),
            statuses: vec![RunStatus::Compensated],
            ..RunFilter::default()
        };
        let by_email = RunFilter {
            query: Some(email),
            ..RunFilter::default()
        };
        let last_day = RunFilter {
            created_from: Some(chrono::Utc::now() - chrono::Duration::hours(24)),
            ..RunFilter::default()
        };
        let engine = Engine::builder(pool.clone()).build()?;
        let list = |filter: &RunFilter, cursor: Option<Cursor>| {
            let (engine, filter) = (engine.clone(), filter.clone());
            async move { engine.list_runs(&filter, cursor, PAGE).await }
        };
        let counts = || {
            let (reads, last_day) = (RunReads::of(&engine), last_day.clone());
            async move { reads.count_runs(&last_day, 10_000).await }
        };
        times.push(ListTimes {
            rows,
            newest_ms: median(|| list(&all, None)).await?,
            by_status_ms: median(|| list(&failed, None)).await?,
            by_workflow_status_ms: median(|| list(&compensated, None)).await?,
            by_email_ms: median(|| list(&by_email, None)).await?,
            deep_page_ms: median(|| list(&all, Some(cursor))).await?,
            counts_ms: median(counts).await?,
            // Each batch deletes the oldest 500; the table stays about as large.
            sweep_ms: median(|| {
                let sweeper = sweeper.clone();
                async move {
                    sweeper
                        .delete_finished_runs(chrono::Utc::now(), sagaflow::workflows::retention::BATCH)
                        .await
                }
            })
            .await?,
            // Last: the sweep above times the table as written too.
            counts_vacuumed_ms: if Some(rows) == largest {
                sqlx::raw_sql("VACUUM runs").execute(pool).await?;
                Some(median(counts).await?)
            } else {
                None
            },
        });
    }
    sqlx::raw_sql("ALTER TABLE runs RESET (autovacuum_enabled)")
        .execute(pool)
        .await?;
    pools.api.close().await;
    pools.worker.close().await;
    Ok(times)
}

/// Synthetic finished runs `from..to`: one a second going back in time, 90% registrations,
/// statuses in a realistic mix, each with a distinct customer email.
async fn fill(pool: &PgPool, from: usize, to: usize) -> Result<()> {
    const BATCH: usize = 50_000;
    let mut start = from;
    while start < to {
        let end = (start + BATCH).min(to);
        sqlx::query(
            "INSERT INTO runs (id, workflow, workflow_version, status, input, subject, idempotency_key, trigger,
                               created_at, updated_at, finished_at, log_seq)
             SELECT gen_random_uuid(),
                    CASE WHEN g % 10 = 9 THEN 'retention-sweep' ELSE 'create-customer-account' END, 1,
                    (ARRAY['completed','completed','completed','completed','completed','completed','completed',
                           'compensated','failed','cancelled'])[1 + (g * 7) % 10]::run_status,
                    jsonb_build_object('authIdentityId', 'authid_' || g,
                                       'customerData', jsonb_build_object('email', 'user' || g || '@example.com')),
                    'user' || g || '@example.com', 'key-' || g, 'api',
                    now() - g * interval '1 second', now() - g * interval '1 second',
                    now() - g * interval '1 second' + interval '40 milliseconds', 0
             FROM generate_series($1::int8, $2::int8 - 1) g",
        )
        .bind(start as i64)
        .bind(end as i64)
        .execute(pool)
        .await?;
        start = end;
    }
    Ok(())
}

/// The median of 9 timed runs after 2 warm-up runs, in milliseconds.
async fn median<F, Fut, T>(mut query: F) -> Result<f64>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, EngineError>>,
{
    for _ in 0..2 {
        query().await?;
    }
    let mut samples: Vec<Duration> = Vec::with_capacity(9);
    for _ in 0..9 {
        let started = Instant::now();
        query().await?;
        samples.push(started.elapsed());
    }
    samples.sort();
    Ok(samples[samples.len() / 2].as_secs_f64() * 1000.0)
}
