//! Leader election through a `coordination.k8s.io/v1` Lease (kube-lease-manager), so two
//! operator replicas never both write. Only the holder runs the controller; a replica that
//! loses the Lease stops its controller and exits, and Kubernetes restarts it as a standby
//! (a clean process is simpler to trust than a controller resumed after a split).

use kube::Client;
use kube_lease_manager::{LeaseManagerBuilder, LeaseManagerError};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Settings of the election.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    /// Namespace of the Lease (the operator's own namespace).
    pub namespace: String,
    /// Name of the Lease.
    pub name: String,
    /// Identity of this replica (its pod name).
    pub identity: String,
    /// Seconds a holder's claim stays valid without renewal.
    pub duration_seconds: u64,
    /// Seconds before expiry at which the holder renews.
    pub grace_seconds: u64,
}

/// A running election: `leading` flips to `true` when this replica holds the Lease.
pub struct Election {
    /// Whether this replica currently holds the Lease.
    pub leading: watch::Receiver<bool>,
    task: JoinHandle<Result<kube_lease_manager::LeaseManager, LeaseManagerError>>,
}

/// Start campaigning for the Lease in the background.
pub async fn campaign(client: Client, config: &LeaseConfig) -> Result<Election, LeaseManagerError> {
    let manager = LeaseManagerBuilder::new(client, &config.name)
        .with_namespace(&config.namespace)
        .with_identity(&config.identity)
        .with_duration(config.duration_seconds)
        .with_grace(config.grace_seconds)
        .with_field_manager(format!("{}-lease", crate::consts::FIELD_MANAGER))
        .build()
        .await?;
    let (leading, task) = manager.watch().await;
    Ok(Election { leading, task })
}

impl Election {
    /// Wait until this replica leads; `false` when the election ended first.
    pub async fn acquired(&mut self) -> bool {
        self.leading.wait_for(|leading| *leading).await.is_ok()
    }

    /// Resolves when leadership is lost (or the election task ends).
    pub async fn lost(mut leading: watch::Receiver<bool>) {
        let _ = leading.wait_for(|leading| !*leading).await;
    }

    /// Stop campaigning and release the Lease if held.
    pub async fn release(self) {
        drop(self.leading);
        match self.task.await {
            Ok(Ok(_)) => tracing::info!("lease released"),
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot release lease"),
            Err(e) => tracing::warn!(error = %e, "lease task failed"),
        }
    }
}
