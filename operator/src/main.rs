//! The `vm-operator` binary: parses the command line and hands over to the library. A
//! failure is printed once, on stderr, as [`cli::describe`](vm_operator::cli::describe)
//! words it (cause chain deduplicated, then the next step), and the exit code is 1.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use vm_operator::cli::{self, Cli, Command, Failure};

#[tokio::main]
async fn main() -> ExitCode {
    match run(Cli::parse().command).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = std::io::stderr().write_all(cli::describe(&e).as_bytes());
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    let out = match command {
        Command::Run(args) => return vm_operator::runtime::run(args).await,
        Command::Crd => vm_operator::render::crd_yaml()?,
        Command::Rbac { name } => serde_yaml::to_string(&vm_operator::rbac::cluster_role(&name))?,
        Command::Render {
            file,
            secrets,
            config_maps,
        } => {
            let read = |p: &std::path::PathBuf| {
                std::fs::read_to_string(p).with_context(|| {
                    Failure::new(
                        format!("cannot read {}", p.display()),
                        cli::RENDER_INPUT_HINT,
                    )
                })
            };
            let referenced = secrets
                .iter()
                .chain(&config_maps)
                .map(read)
                .collect::<anyhow::Result<Vec<_>>>()?;
            vm_operator::render::render(&read(&file)?, &referenced).with_context(|| {
                Failure::new(
                    format!("cannot render {}", file.display()),
                    cli::RENDER_INPUT_HINT,
                )
            })?
        }
    };
    std::io::stdout().write_all(out.as_bytes())?;
    Ok(())
}
