//! Workflows built on the engine, registered by the server.

use crate::engine::EngineBuilder;

/// Registers every built-in workflow.
pub fn register_builtins(builder: EngineBuilder) -> EngineBuilder {
    builder
}
