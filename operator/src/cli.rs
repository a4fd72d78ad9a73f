//! Command line of `vm-operator`: `run`, `crd`, `render` and `rbac`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::telemetry::LogFormat;

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
    /// Run the controller (with leader election, admin server and JSON logs).
    Run(RunArgs),
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
    /// Print the RBAC rules the operator needs, as a ClusterRole.
    Rbac {
        /// Name of the ClusterRole.
        #[arg(long, default_value = "vm-operator")]
        name: String,
    },
}

/// Options of `vm-operator run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Watch VmWebapps in this namespace only (default: every namespace).
    #[arg(long, env = "WATCH_NAMESPACE")]
    pub namespace: Option<String>,
    /// Address of the admin server (`/healthz`, `/readyz`, `/metrics`).
    #[arg(long, env = "ADMIN_ADDR", default_value = "0.0.0.0:8080")]
    pub admin_addr: SocketAddr,
    /// Disable leader election (only for a single replica, e.g. local development).
    #[arg(long, env = "DISABLE_LEADER_ELECTION")]
    pub no_leader_election: bool,
    /// Namespace of the leader-election Lease (the operator's own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,
    /// Name of the leader-election Lease.
    #[arg(long, default_value = "vm-operator-leader")]
    pub lease_name: String,
    /// Identity of this replica in the election (its pod name).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Seconds the Lease stays valid without renewal.
    #[arg(long, default_value_t = 15)]
    pub lease_duration_seconds: u64,
    /// Reconciles running at once.
    #[arg(long, default_value_t = 4)]
    pub concurrency: u16,
    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,
    /// Log level (overridden by `RUST_LOG`).
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    pub log_level: String,
}
