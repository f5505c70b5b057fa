//! Workflows built on the engine, registered by the server.
//!
//! - [`customer_account`]: `create-customer-account`, customer registration after Medusa.
//! - [`retention`]: `retention-sweep`, deleting runs finished longer ago than the retention
//!   period.

pub mod customer_account;
pub mod retention;

use crate::engine::EngineBuilder;

/// Settings of the built-in workflows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Builtins {
    /// How long `retention-sweep` keeps finished runs, and the shortest period it accepts.
    pub retention: retention::Retention,
}

/// Registers every built-in workflow.
pub fn register_builtins(builder: EngineBuilder, settings: &Builtins) -> EngineBuilder {
    builder
        .register(customer_account::workflow())
        .register(retention::workflow(settings.retention))
}
