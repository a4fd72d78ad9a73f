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
    /// Write a consistent logical snapshot of the database (either backend)
    /// to a file. Uses the migration credentials when they are set.
    Backup(BackupArgs),
    /// Load a snapshot into an empty, migrated database of either backend.
    Restore(RestoreArgs),
    /// Usage metering tools (`usage verify --period YYYY-MM`).
    Usage(UsageArgs),
}

/// `usage` options.
#[derive(Debug, Args)]
pub struct UsageArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: UsageCommand,
}

/// `usage` subcommands.
#[derive(Debug, Subcommand)]
pub enum UsageCommand {
    /// Recompute a period's usage from the ledger and from the runs and
    /// results, print every difference, exit non-zero on any.
    Verify {
        /// The UTC month, YYYY-MM (checked while parsing the arguments, so a
        /// bad one is a usage error, exit 2, not a difference, exit 1).
        #[arg(long, value_name = "YYYY-MM", value_parser = parse_period)]
        period: String,
    },
}

/// A `--period`: exactly `YYYY-MM`, a month from 2000-01 to 9999-11.
fn parse_period(s: &str) -> Result<String, String> {
    crate::period::Period::parse(s)
        .map(|p| p.to_string())
        .ok_or_else(|| {
            "must be a month as YYYY-MM (UTC) from 2000-01 to 9999-11, such as 2026-11".to_string()
        })
}

/// `backup` options: one file, or a directory of timestamped files pruned to
/// the newest `--keep`.
#[derive(Debug, Args)]
pub struct BackupArgs {
    /// The file to write (written as FILE.partial, renamed when complete).
    #[arg(
        long,
        value_name = "FILE",
        required_unless_present = "output_dir",
        conflicts_with = "output_dir"
    )]
    pub output: Option<std::path::PathBuf>,
    /// A directory to write `vm-webapp-backup-<UTC time>.jsonl` into (the
    /// operator's CronJob uses this with a PVC).
    #[arg(long, value_name = "DIR")]
    pub output_dir: Option<std::path::PathBuf>,
    /// With --output-dir: complete backups to keep, newest first; older ones
    /// are deleted after a successful backup.
    #[arg(long, requires = "output_dir", value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub keep: Option<u32>,
}

/// `restore` options.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The snapshot written by `vm-webapp backup`.
    #[arg(long, value_name = "FILE")]
    pub input: std::path::PathBuf,
    /// Replace the content of a database that is not empty (deleted in the
    /// same transaction as the load) instead of refusing.
    #[arg(long)]
    pub force: bool,
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
    /// Sleep between claims when idle, in milliseconds: without Redis, the
    /// longest a run queued by another process, or a retry that falls due,
    /// waits for this worker (with Redis, new runs wake it at once).
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
