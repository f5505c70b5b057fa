//! Cron schedules: each tick of an enabled schedule starts one run of its workflow.
//!
//! - [`expr`]: cron expressions in a time zone, and the tick after or before an instant
//!   (crontab's five fields or the `cron` crate's six or seven; days clocks change).
//! - [`describe`]: an expression in words.
//! - [`plan`]: the pure decisions: which due ticks fire under the catch-up policy, where the
//!   next tick lies after a change, what the overlap policy allows.
//! - [`clock`]: wall-clock time behind a trait, so tests move time instead of waiting.

pub mod clock;
pub mod describe;
pub mod expr;
pub mod plan;

use serde::{Deserialize, Serialize};

pub use clock::{Clock, ManualClock, SystemClock};
pub use expr::{CronExpr, ExprError};
pub use plan::CatchUpRules;

/// What a tick does while an earlier run of the same schedule is unfinished.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, sqlx::Type, utoipa::ToSchema)]
#[sqlx(type_name = "schedule_overlap", rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum Overlap {
    /// Start another run anyway.
    Allow,
    /// Skip the tick (the default: most scheduled work must not run twice at once).
    #[default]
    Skip,
}

/// Which ticks missed while no instance was running fire once one is again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, sqlx::Type, utoipa::ToSchema)]
#[sqlx(type_name = "schedule_catch_up", rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum CatchUp {
    /// None: wait for the next tick.
    None,
    /// The most recent missed tick fires once (the default).
    #[default]
    Latest,
    /// Every missed tick fires, oldest first, up to a bound (the most recent ones).
    All,
}
