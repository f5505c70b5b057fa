//! Workflows built on the engine, registered by the server.
//!
//! - [`customer_account`]: `create-customer-account`, customer registration after Medusa.
//! - [`retention`]: `retention-sweep`, deleting runs finished longer ago than the retention
//!   period.

pub mod customer_account;
pub mod retention;

use std::time::Duration;

use crate::engine::EngineBuilder;

/// Settings of the built-in workflows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Builtins {
    /// How long `retention-sweep` keeps finished runs when its input does not say.
    pub retention_period: Duration,
}

impl Default for Builtins {
    fn default() -> Self {
        Self {
            retention_period: retention::DEFAULT_PERIOD,
        }
    }
}

/// Registers every built-in workflow.
pub fn register_builtins(builder: EngineBuilder, settings: &Builtins) -> EngineBuilder {
    builder
        .register(customer_account::workflow())
        .register(retention::workflow(settings.retention_period))
}
