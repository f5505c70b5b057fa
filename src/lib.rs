//! sagaflow: a durable saga orchestrator on PostgreSQL.
//!
//! # Layout
//!
//! - [`engine`]: the domain-agnostic durable saga engine. Workflow definitions, the pure state
//!   machine deciding every transition, `engine::apply` (the one place a transition is
//!   written, with the workflow's finish hook whenever a run ends), the executor (one
//!   transaction per step), the worker (claims, leases, heartbeats, recovery, parking,
//!   shutdown), `engine::store` (crate-private: the engine's SQL about runs), and
//!   `engine::scheduler`, cron schedules firing each tick once across instances (with its own
//!   `store`).
//! - [`defined`]: workflows defined as data: JSON definitions stored and versioned in
//!   PostgreSQL, compiled into engine workflows whose steps are signed HTTP calls.
//! - [`domain`]: the customer domain (customers, addresses, auth identities, the outbox) and
//!   its SQL.
//! - [`workflows`]: workflows built on the engine and registered by the server;
//!   `create-customer-account` first, and `retention-sweep`.
//! - [`http`]: the axum application: JSON API, OpenAPI, health, metrics, and the operator
//!   dashboard (`http::dashboard`, with its templates and static files in `dashboard/`).
//! - [`pg`]: connecting to PostgreSQL, migrations, and the embedded default cluster.
//! - [`check`]: the invariant checker (docs/contract.md §6) behind `sagaflow check` and the crash tests.
//! - [`server`]: assembles database, engine, worker and HTTP into the `serve` command, and
//!   [`server::Server`] serves an embedding application's own workflows the same way.
//! - [`telemetry`]: logging setup (human-readable or JSON).
//!
//! The engine knows nothing of customers or HTTP; workflows know nothing of HTTP.

#[macro_use]
mod names;

pub mod check;
pub mod defined;
pub mod domain;
pub mod engine;
pub mod http;
pub mod pg;
pub mod server;
pub mod signing;
pub mod telemetry;
pub mod webhooks;
pub mod workflows;
