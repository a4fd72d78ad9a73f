//! vm-webapp: the vmwebapp runtime.
//!
//! An HTTP API that accepts runs ([`http`]), a durable queue of their steps in
//! SQLite or PostgreSQL ([`store`]), a worker that drains it ([`worker`]), and
//! the commands that wire them ([`runtime`]), live updates of run events
//! ([`stream`]) and the web console ([`http::console`]). Settings come from
//! the environment, validated once ([`config`]).

pub mod backup_cmd;
pub mod batch;
pub mod cli;
pub mod config;
pub mod deadline;
pub mod http;
pub mod maintenance;
pub mod metrics;
pub mod model;
pub mod nudge;
pub mod period;
pub mod plans;
pub mod redis_bus;
pub mod runtime;
pub mod steps;
pub mod store;
pub mod stream;
pub mod telemetry;
pub mod usage_cmd;
pub mod worker;

/// Makes `ring` the process-wide TLS crypto provider (the one stack shared by
/// the database driver and the LLM client). Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
