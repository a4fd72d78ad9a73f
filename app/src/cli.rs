//! Command-line interface. The operator renders these arguments into its
//! Deployments and Jobs, so they are part of the app/operator contract.

use clap::{Args, Parser, Subcommand};

/// The vmwebapp runtime.
#[derive(Debug, Parser)]
#[command(
    name = "vm-webapp",
    version,
    about = "vmwebapp runtime: run API, durable queue and worker"
)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the HTTP API (and, outside managed mode, the worker in-process).
    Serve(ServeArgs),
    /// Run the background worker only; probes on --health-port.
    Worker(WorkerArgs),
    /// Apply database migrations and exit. Idempotent.
    Migrate,
    /// Validate the environment, print what is wrong (never a secret), and exit.
    CheckConfig,
}

/// `serve` options.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to bind.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to bind; defaults to `PORT`, else 8000.
    #[arg(long)]
    pub port: Option<u16>,
}

/// `worker` options.
#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// Sleep between claims when idle, in milliseconds.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(10..=60_000))]
    pub poll_interval_ms: u64,
    /// Jobs executed at once. A waiting step holds no connection, so slow
    /// (LLM-like) steps can run by the thousand; memory is the bound.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub concurrency: u64,
    /// Port of the worker's own probes.
    #[arg(long, default_value_t = 9091)]
    pub health_port: u16,
    /// Address of the worker's own probes.
    #[arg(long, default_value = "0.0.0.0")]
    pub health_host: String,
}
