//! The `vm-operator` binary: parses the command line and hands over to the library.

use std::io::Write;

use anyhow::Context;
use clap::Parser;
use vm_operator::cli::{Cli, Command};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let out = match Cli::parse().command {
        Command::Run(args) => return vm_operator::runtime::run(args).await,
        Command::Crd => vm_operator::render::crd_yaml()?,
        Command::Rbac { name } => serde_yaml::to_string(&vm_operator::rbac::cluster_role(&name))?,
        Command::Render { file, secrets } => {
            let read = |p: &std::path::PathBuf| {
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
            };
            let secrets = secrets
                .iter()
                .map(read)
                .collect::<anyhow::Result<Vec<_>>>()?;
            vm_operator::render::render(&read(&file)?, &secrets)?
        }
    };
    std::io::stdout().write_all(out.as_bytes())?;
    Ok(())
}
