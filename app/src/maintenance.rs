//! Queue maintenance, once per database: every process that touches the queue
//! (workers, and `serve` without an embedded worker) runs this loop, but only
//! the elected leader ([`Store::try_lead_maintenance`]) acts: it returns jobs
//! whose lease expired to the queue and refreshes the queue-gauge snapshot
//! that `/metrics` reads, so a scrape never scans the queue.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::metrics::{Dependency, Metrics};
use crate::store::Store;
use crate::store::queue::MaintenanceLease;

/// Runs until `shutdown`: each `every`, becomes leader if nobody is, and as
/// leader rescues expired leases and refreshes the gauges. A database outage
/// is counted and logged; the loop goes on and recovers by itself.
pub async fn run(
    store: Store,
    every: Duration,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut lease: Option<MaintenanceLease> = None;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Some(held) = lease.as_mut()
            && !held.still_held().await
        {
            warn!("lost the queue-maintenance leadership (its connection failed)");
            lease = None;
        }
        if lease.is_none() {
            match store.try_lead_maintenance().await {
                Ok(Some(l)) => lease = Some(l),
                Ok(None) => continue,
                Err(e) => {
                    metrics.dependency_failed(Dependency::database);
                    warn!(error = %e, "could not contend for queue maintenance");
                    continue;
                }
            }
        }
        match store.rescue_expired().await {
            Ok(0) => {}
            Ok(n) => {
                metrics.jobs_rescued.inc_by(n);
                info!(jobs = n, "rescued jobs whose lease expired");
            }
            Err(e) => {
                metrics.dependency_failed(Dependency::database);
                warn!(error = %e, "could not rescue expired leases");
            }
        }
        if let Err(e) = store.refresh_queue_stats().await {
            metrics.dependency_failed(Dependency::database);
            warn!(error = %e, "could not refresh the queue gauges");
        }
    }
}
