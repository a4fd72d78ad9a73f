//! `vm-operator run`: wires telemetry, the admin server, leader election and the controller,
//! and shuts down gracefully on SIGTERM or Ctrl-C (readiness flips first, in-flight
//! reconciles finish, the Lease is released, then the process exits).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use futures::FutureExt;
use kube::Client;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::admin::{self, AdminState};
use crate::cli::{Failure, RunArgs};
use crate::controller::{self, Context};
use crate::leader::{self, Election, LeaseConfig};
use crate::metrics::{self, Metrics};

/// Run the operator until a shutdown signal; an error when leadership is lost.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    crate::telemetry::init(args.log_format, &args.log_level)
        .map_err(|e| anyhow::anyhow!("cannot set up logging: {e}"))?;
    // kube's TLS uses the process-wide rustls provider; pin ring (never aws-lc-rs or OpenSSL).
    // An error only means a provider is already installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = Client::try_default().await.context(Failure::new(
        "cannot build a Kubernetes client",
        crate::cli::NO_CLUSTER_HINT,
    ))?;

    let lease_namespace = (!args.no_leader_election).then_some(args.lease_namespace.as_str());
    let missing = crate::rbac::missing_permissions(
        client.clone(),
        args.namespace.as_deref(),
        lease_namespace,
    )
    .await
    .context(Failure::new(
        "cannot check the operator's permissions",
        "check that the API server in KUBECONFIG (or the in-cluster one) is reachable and that the operator's service account exists",
    ))?;
    if !missing.is_empty() {
        anyhow::bail!(
            "the operator's service account lacks permissions (compare with `vm-operator rbac`): {}",
            missing.join(", ")
        );
    }

    let mut registry = metrics::registry();
    let metrics = Metrics::register(&mut registry);
    let ready = Arc::new(AtomicBool::new(false));
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };

    let admin_state = AdminState {
        registry: Arc::new(registry),
        ready: ready.clone(),
    };
    let admin = tokio::spawn(admin::serve(args.admin_addr, admin_state, stopped()));

    let signal_ready = ready.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        info!("shutdown requested");
        signal_ready.store(false, Ordering::Release);
        let _ = stop_tx.send(true);
    });

    let ctx = Arc::new(Context::new(client.clone(), metrics).with_concurrency(args.concurrency));
    let outcome = if args.no_leader_election {
        ready.store(true, Ordering::Release);
        info!(namespace = ?args.namespace, "leader election disabled; starting controller");
        controller::run(client, args.namespace.clone(), ctx, stopped()).await;
        Ok(())
    } else {
        let identity = args
            .identity
            .clone()
            .unwrap_or_else(|| format!("vm-operator-{}", std::process::id()));
        let config = LeaseConfig {
            namespace: args.lease_namespace.clone(),
            name: args.lease_name.clone(),
            identity,
            duration_seconds: args.lease_duration_seconds,
            // Renew a third of the way in: two thirds of the duration remain for
            // retries before the local deadline stops this replica.
            grace_seconds: (args.lease_duration_seconds * 2 / 3).max(2),
        };
        lead_then_run(client, &args, &config, ctx, ready.clone(), stopped).await
    };

    ready.store(false, Ordering::Release);
    match tokio::time::timeout(Duration::from_secs(5), admin).await {
        Ok(Ok(Err(e))) => warn!(error = %e, "admin server failed"),
        Err(_) => warn!("admin server did not stop in time"),
        _ => {}
    }
    outcome
}

async fn lead_then_run<F, Fut>(
    client: Client,
    args: &RunArgs,
    config: &LeaseConfig,
    ctx: Arc<Context>,
    ready: Arc<AtomicBool>,
    stopped: F,
) -> anyhow::Result<()>
where
    F: Fn() -> Fut,
    Fut: Future<Output = ()> + Send + Sync + 'static,
{
    let lease_client = lease_client().await?;
    let mut election = leader::campaign(lease_client.clone(), config)
        .await
        .context("cannot start leader election")?;
    // A standby is healthy and ready; only the leader writes.
    ready.store(true, Ordering::Release);
    info!(identity = %config.identity, lease = %config.name, "waiting for leadership");
    let acquired = tokio::select! {
        acquired = election.acquired() => acquired,
        () = stopped() => false,
    };
    if !acquired {
        election.release().await;
        return Ok(());
    }
    info!(namespace = ?args.namespace, "leading; starting controller");
    let lost = Arc::new(AtomicBool::new(false));
    let lost_flag = lost.clone();
    // The Lease manager's channel reports a loss it noticed; the deadline also catches
    // renewals that fail or hang, which the channel never reports.
    let reported = Election::lost(election.leading.clone());
    let expired = tokio::spawn(leader::deadline_passed(lease_client, config.clone()));
    let abort_expired = expired.abort_handle();
    let leadership_lost = async move {
        tokio::select! {
            () = reported => {}
            _ = expired => {}
        }
    }
    .map(move |()| lost_flag.store(true, Ordering::Release));
    let stop = stopped();
    let shutdown = async move {
        tokio::select! {
            () = leadership_lost => warn!("leadership lost; stopping controller"),
            () = stop => {}
        }
    };
    controller::run(client, args.namespace.clone(), ctx, shutdown).await;
    abort_expired.abort();
    election.release().await;
    if lost.load(Ordering::Acquire) {
        anyhow::bail!("lost the leader Lease; exiting so that a fresh standby takes over");
    }
    Ok(())
}

/// A client for the election only, with short timeouts: a renewal that hangs must fail fast
/// enough for the Lease manager to retry (and for the deadline to notice) within one lease.
async fn lease_client() -> anyhow::Result<Client> {
    let mut config = kube::Config::infer()
        .await
        .context("cannot load the Kubernetes client configuration")?;
    config.connect_timeout = Some(leader::READ_TIMEOUT);
    config.read_timeout = Some(leader::READ_TIMEOUT);
    config.write_timeout = Some(leader::READ_TIMEOUT);
    Client::try_from(config).context("cannot build the lease client")
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
