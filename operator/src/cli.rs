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
        /// The ConfigMap manifest `spec.plans` names, whose data feeds the config hash too.
        #[arg(long = "config-map")]
        config_maps: Vec<PathBuf>,
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
    /// Log level: `off`, `error`, `warn`, `info`, `debug` or `trace`, or `tracing`
    /// directives such as `warn,vm_operator=debug` (overridden by `RUST_LOG`). A bare word
    /// that is not a level is refused at start-up: a typo must not silently turn the logs
    /// off.
    #[arg(long, env = "LOG_LEVEL", default_value = "info", value_parser = parse_level)]
    pub log_level: String,
}

/// A failure of a command together with what the user can do next. Attach it as the
/// outermost context of an error (`.context(Failure::new(…, …))`); [`describe`] prints the
/// step after the cause chain.
#[derive(Debug)]
pub struct Failure {
    /// What could not be done, e.g. "cannot build a Kubernetes client".
    pub what: String,
    /// What to try next, e.g. "set KUBECONFIG …".
    pub next: &'static str,
}

impl Failure {
    /// A failure of `what`, followed by the hint `next`.
    pub fn new(what: impl Into<String>, next: &'static str) -> Self {
        Self {
            what: what.into(),
            next,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.what)
    }
}

/// Hint when no Kubernetes client can be built.
pub const NO_CLUSTER_HINT: &str = "point KUBECONFIG at a kubeconfig (or run inside a cluster with a service account); `vm-operator render -f FILE` prints the objects without any cluster";

/// Hint when `render` cannot read or parse its input.
pub const RENDER_INPUT_HINT: &str = "pass a VmWebapp manifest (apiVersion webapp.vm.dev/v1alpha1, kind VmWebapp), for example `vm-operator render -f examples/minimal.yaml`";

/// The text printed for a command that failed: one line with the error and each cause of
/// its chain that adds something (libraries often repeat their source's message in their
/// own, so a cause already contained in what was printed is dropped), then the next step
/// when the error carries a [`Failure`].
pub fn describe(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        let text = text.trim();
        if text.is_empty() || line.contains(text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(text);
    }
    let mut out = format!("error: {line}\n");
    if let Some(f) = err.downcast_ref::<Failure>() {
        out.push_str(&format!("next step: {}\n", f.next));
    }
    out
}

/// `--log-level`: a level name, or comma-separated `tracing` directives in which every bare
/// word is a level name (`warn,vm_operator=debug`). A bare word that is not a level is
/// refused: `tracing` would read it as a target name and log nothing.
fn parse_level(s: &str) -> Result<String, String> {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    let hint =
        "use off, error, warn, info, debug or trace, or directives such as warn,vm_operator=debug";
    for directive in s.split(',').map(str::trim) {
        let bare = !directive.contains('=') && !directive.contains('[');
        if bare && !LEVELS.contains(&directive.to_ascii_lowercase().as_str()) {
            return Err(format!("`{directive}` is not a log level: {hint}"));
        }
    }
    tracing_subscriber::EnvFilter::try_new(s)
        .map_err(|e| format!("`{s}` is not a log filter ({e}): {hint}"))?;
    Ok(s.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("failed to infer config: kubeconfig: (failed to read '/nope': No such file)")]
    struct Outer(#[source] Inner);

    #[derive(Debug, thiserror::Error)]
    #[error("failed to read '/nope': No such file")]
    struct Inner(#[source] std::io::Error);

    #[test]
    fn nested_causes_that_repeat_their_source_are_printed_once_with_a_next_step() {
        // Without the deduplication the same "No such file" reached the user four times.
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file");
        let err = anyhow::Error::new(Outer(Inner(io))).context(Failure::new(
            "cannot build a Kubernetes client",
            NO_CLUSTER_HINT,
        ));
        let text = describe(&err);
        assert_eq!(text.matches("No such file").count(), 1, "{text}");
        assert_eq!(text.matches("cannot build").count(), 1, "{text}");
        assert!(
            text.starts_with("error: cannot build a Kubernetes client: failed to infer config")
        );
        assert!(text.contains("next step: point KUBECONFIG"), "{text}");
        assert_eq!(text.lines().count(), 2, "{text}");
    }

    #[test]
    fn a_cause_that_adds_information_is_kept() {
        let err = anyhow::anyhow!("connection refused").context("cannot list VmWebapps");
        assert_eq!(
            describe(&err),
            "error: cannot list VmWebapps: connection refused\n"
        );
    }
}
