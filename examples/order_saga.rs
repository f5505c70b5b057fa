//! A workflow of your own in a few lines: reserve stock, charge a card, and undo the
//! reservation when the charge fails for good.
//!
//! Run it with `cargo run --example order_saga` (embedded PostgreSQL in `.sagaflow-example/`,
//! or `DATABASE_URL`). Pass `--decline` to see the compensation.

use std::time::Duration;

use async_trait::async_trait;
use sagaflow::engine::{
    Compensate, Completed, Engine, EngineConfig, RetryPolicy, Step, StepContext, StepDef, StepError, TriggerOptions,
    Workflow,
};
use sagaflow::pg::PoolConfig;
use sagaflow::server::Database;
use serde::{Deserialize, Serialize};
use serde_json::json;

#[derive(Deserialize)]
struct Order {
    sku: String,
    quantity: i32,
    decline: bool,
}

#[derive(Serialize, Deserialize)]
struct Reservation {
    reservation_id: i64,
}

/// Writes to the database inside the step's transaction: committed exactly once, together
/// with the step's recorded outcome.
struct ReserveStock;

#[async_trait]
impl Step for ReserveStock {
    type Output = Reservation;

    async fn invoke(&self, ctx: &mut StepContext<'_>) -> Result<Reservation, StepError> {
        let order: Order = ctx.input()?;
        let run_id = ctx.run_id();
        let reservation_id = sqlx::query_scalar(
            "INSERT INTO example_reservations (run_id, sku, quantity) VALUES ($1, $2, $3) RETURNING id",
        )
        .bind(run_id)
        .bind(order.sku)
        .bind(order.quantity)
        .fetch_one(ctx.db().await?)
        .await?;
        Ok(Reservation { reservation_id })
    }
}

#[async_trait]
impl Compensate for ReserveStock {
    async fn compensate(&self, ctx: &mut StepContext<'_>, done: Completed<Reservation>) -> Result<(), StepError> {
        if let Completed::Output(reservation) = done {
            sqlx::query("DELETE FROM example_reservations WHERE id = $1")
                .bind(reservation.reservation_id)
                .execute(ctx.db().await?)
                .await?;
        }
        Ok(())
    }
}

/// Talks to the outside world: at least once, with a stable idempotency key per run.
struct ChargeCard;

#[async_trait]
impl Step for ChargeCard {
    type Output = String;

    async fn invoke(&self, ctx: &mut StepContext<'_>) -> Result<String, StepError> {
        let order: Order = ctx.input()?;
        if order.decline {
            return Err(StepError::permanent("card declined"));
        }
        Ok(format!("charge for {}", ctx.idempotency_key()))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _log = sagaflow::telemetry::init(Default::default());
    let decline = std::env::args().any(|a| a == "--decline");
    let url = std::env::var("DATABASE_URL").ok();
    let db = Database::open(url.as_deref(), ".sagaflow-example".as_ref(), &PoolConfig::default()).await?;
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS example_reservations (
             id bigserial PRIMARY KEY, run_id uuid NOT NULL, sku text NOT NULL, quantity int NOT NULL)",
    )
    .execute(&db.pool)
    .await?;

    let workflow = Workflow::builder("place-order", 1)
        .description("reserve stock, then charge the card")
        .input::<serde_json::Value>()
        .step(StepDef::compensable("reserve-stock", ReserveStock))
        .step(
            StepDef::new("charge-card", ChargeCard)
                .retry(RetryPolicy::attempts(3))
                .timeout(Duration::from_secs(5)),
        )
        .build()?;
    let engine = Engine::builder(db.pool.clone())
        .config(EngineConfig {
            node_id: "example".into(),
            ..Default::default()
        })
        .register(workflow)
        .build()?;
    let worker = engine.start_worker().await?;

    let input = json!({"sku": "mug", "quantity": 2, "decline": decline});
    let run = engine.trigger("place-order", input, TriggerOptions::default()).await?;
    let status = engine.wait_for_terminal(run.run_id, Duration::from_secs(10)).await?;
    println!("run {} ended {status}", run.run_id);
    for event in engine.events(run.run_id).await?.unwrap_or_default() {
        println!(
            "  {:>2} {:<28} {:<14} {}",
            event.seq,
            event.kind,
            event.step.unwrap_or_default(),
            event.detail
        );
    }
    worker.shutdown().await;
    db.close().await;
    Ok(())
}
