//! Workflows built on the engine, registered by the server.
//!
//! - [`customer_account`]: `create-customer-account`, customer registration after Medusa.

pub mod customer_account;

use crate::engine::EngineBuilder;

/// Registers every built-in workflow.
pub fn register_builtins(builder: EngineBuilder) -> EngineBuilder {
    builder.register(customer_account::workflow())
}
