//! `vm-webapp` binary: parses the command line and hands over to the runtime.

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    vm_webapp::runtime::run(vm_webapp::cli::Cli::parse()).await
}
