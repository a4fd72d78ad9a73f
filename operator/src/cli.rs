//! Command line of `vm-operator`: `run`, `crd`, `render` and `rbac`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Kubernetes operator for vm-webapp.
#[derive(Debug, Parser)]
#[command(name = "vm-operator", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the VmWebapp CustomResourceDefinition as YAML.
    Crd,
    /// Print, without a cluster, the objects a reconcile of a VmWebapp manifest applies.
    Render {
        /// The VmWebapp manifest.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        /// Secret manifests whose data feeds the pod-template config hash (repeatable);
        /// without them referenced keys hash as unknown.
        #[arg(long = "secret")]
        secrets: Vec<PathBuf>,
    },
}
