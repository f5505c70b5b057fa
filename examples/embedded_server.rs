//! Your own workflows, served with everything `sagaflow serve` has: the HTTP API, the
//! dashboard, schedules, the worker and the embedded PostgreSQL.
//!
//! Run it with `cargo run --example embedded_server` (embedded PostgreSQL in
//! `.sagaflow-embedded/`, or `DATABASE_URL`), then, in another shell:
//!
//! ```sh
//! curl -s -X POST 'localhost:3000/v1/workflows/welcome-customer/runs?wait_ms=5000' \
//!   -H "Authorization: Bearer $API_TOKEN" -H 'Content-Type: application/json' \
//!   -d '{"name": "Ada", "email": "ada@example.com"}'
//! ```
//!
//! with the API token it prints (or the one in `SAGAFLOW_API_TOKEN`).

use async_trait::async_trait;
use sagaflow::engine::{Compensate, Completed, Step, StepContext, StepDef, StepError, Workflow};
use sagaflow::http::auth::generate_token;
use sagaflow::server::{Server, ServerConfig};
use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Welcome {
    name: String,
    email: String,
}

#[derive(Serialize, Deserialize)]
struct Letter {
    to: String,
    text: String,
}

/// Writes the letter (a pure computation: its output is recorded with the step).
struct Compose;

#[async_trait]
impl Step for Compose {
    type Output = Letter;

    async fn invoke(&self, ctx: &mut StepContext<'_>) -> Result<Letter, StepError> {
        let welcome: Welcome = ctx.input()?;
        Ok(Letter {
            to: welcome.email,
            text: format!("Welcome, {}!", welcome.name),
        })
    }
}

/// Queues the letter in the application's own table, in the step's transaction (exactly
/// once), and takes it back out if the run compensates.
struct Queue;

#[async_trait]
impl Step for Queue {
    type Output = ();

    async fn invoke(&self, ctx: &mut StepContext<'_>) -> Result<(), StepError> {
        let letter: Letter = ctx.output("compose")?;
        let run = ctx.run_id();
        let db = ctx.db().await?;
        sqlx::query("CREATE TABLE IF NOT EXISTS example_outbox (run_id uuid PRIMARY KEY, recipient text, body text)")
            .execute(&mut *db)
            .await?;
        sqlx::query("INSERT INTO example_outbox VALUES ($1, $2, $3) ON CONFLICT DO NOTHING")
            .bind(run)
            .bind(&letter.to)
            .bind(&letter.text)
            .execute(&mut *db)
            .await?;
        Ok(())
    }
}

#[async_trait]
impl Compensate for Queue {
    async fn compensate(&self, ctx: &mut StepContext<'_>, _: Completed<()>) -> Result<(), StepError> {
        let run = ctx.run_id();
        sqlx::query("DELETE FROM example_outbox WHERE run_id = $1")
            .bind(run)
            .execute(ctx.db().await?)
            .await?;
        Ok(())
    }
}

/// The workflow this application adds to the server.
fn welcome_customer() -> Result<Workflow, sagaflow::engine::DefinitionError> {
    Workflow::builder("welcome-customer", 1)
        .description("Compose a welcome letter and queue it")
        .input::<Welcome>()
        .subject(|input| input.get("email").and_then(|e| e.as_str()).map(str::to_string))
        .step(StepDef::new("compose", Compose))
        .step(StepDef::compensable("queue", Queue))
        .build()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _log = sagaflow::telemetry::init(sagaflow::telemetry::LogFormat::Text);
    let token = |env: &str| std::env::var(env).unwrap_or_else(|_| generate_token());
    let mut config = ServerConfig::new(token("SAGAFLOW_API_TOKEN"), token("SAGAFLOW_ADMIN_TOKEN"));
    config.database_url = std::env::var("DATABASE_URL").ok();
    config.data_dir = ".sagaflow-embedded".into();
    println!("API token:   {}", config.api_token);
    println!(
        "admin token: {} (the dashboard: http://{}/)",
        config.admin_token, config.listen
    );
    Server::builder(config).workflow(welcome_customer()?).run().await?;
    Ok(())
}
