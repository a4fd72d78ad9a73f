//! The `vm-operator` binary: parses the command line and hands over to the library.

use std::io::Write;

use anyhow::Context;
use clap::Parser;
use vm_operator::cli::{Cli, Command};

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let out = match cli.command {
        Command::Crd => vm_operator::render::crd_yaml()?,
        Command::Render { file, secrets } => {
            let manifest = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            let secrets = secrets
                .iter()
                .map(|p| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display())))
                .collect::<anyhow::Result<Vec<_>>>()?;
            vm_operator::render::render(&manifest, &secrets)?
        }
    };
    std::io::stdout().write_all(out.as_bytes())?;
    Ok(())
}
