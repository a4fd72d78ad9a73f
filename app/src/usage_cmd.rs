//! The `usage verify` command: recomputes a period's usage from the ledger
//! and from the runs and results ([`crate::store::usage_verify`]) and
//! reports every difference. Exit code 0 when all agree, 1 on any difference
//! (or when the database cannot be read, or does not exist: a verify never
//! creates a database), 2 for an invalid configuration
//! or invalid arguments (a `--period` that is not `YYYY-MM` is refused by
//! the argument parser).

use crate::cli::{UsageArgs, UsageCommand};
use crate::config::Settings;
use crate::period::Period;
use crate::runtime::describe;
use crate::store::Store;

/// Runs a `usage` subcommand. Prints what it found on stdout; the error
/// (differences found, bad period, database unreachable) goes back to the
/// caller, which prints it and exits non-zero.
pub async fn run(settings: &Settings, args: &UsageArgs) -> Result<(), String> {
    match &args.command {
        UsageCommand::Verify { period } => verify(settings, period).await,
    }
}

async fn verify(settings: &Settings, period: &str) -> Result<(), String> {
    let period = Period::parse(period).ok_or_else(|| {
        "--period must be a month as YYYY-MM (UTC) from 2000-01 to 9999-11, such as 2026-11"
            .to_string()
    })?;
    // A verify reads: it never creates a database. Pointed at a path with
    // no database it fails instead of creating an empty one.
    let store = Store::connect_existing(&settings.database, 2)
        .await
        .map_err(|e| crate::runtime::cannot_open(settings.database.backend, &e))?;
    // A database without the usage tables says what to do, not "database error".
    if let Err(e) = store.ensure_schema().await {
        store.close().await;
        return Err(describe(&e));
    }
    let result = store.verify_usage(period).await;
    store.close().await;
    let differences = result.map_err(|e| format!("cannot verify usage: {}", describe(&e)))?;
    if differences.is_empty() {
        println!("usage {period}: counters, ledger, runs and results agree");
        return Ok(());
    }
    for d in &differences {
        println!("difference: {d}");
    }
    Err(format!(
        "usage {period}: {} difference(s) between counters, ledger, runs and results",
        differences.len()
    ))
}
