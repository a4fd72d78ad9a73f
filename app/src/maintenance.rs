//! Queue maintenance, once per database: every process that touches the queue
//! (workers, and `serve` without an embedded worker) runs this loop, but only
//! the holder of the maintenance lease ([`Store::lead_maintenance`], on the
//! database clock) acts: it returns jobs whose lease expired to the queue,
//! applies `on_timeout` to approval steps whose deadline passed (once: a
//! decision racing it is decided by one conditional delete; a step queued
//! by it is announced like a new run's, so workers claim it at once), and refreshes the queue-gauge snapshot that `/metrics` reads, so a scrape never
//! scans the queue. A leader that stops (dies, hangs, is paused) loses the
//! lease after [`LEASE_TICKS`] ticks and another process takes over.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::metrics::{Dependency, Metrics};
use crate::nudge::Nudge;
use crate::store::Store;

/// Most approval deadlines applied per tick (the rest wait a tick).
pub const EXPIRE_BATCH: i64 = 200;

/// The maintenance lease lasts this many ticks: one late tick does not lose it,
/// a stopped leader is replaced within a few.
pub const LEASE_TICKS: u32 = 3;

/// Runs until `shutdown`: each `every`, takes or renews the maintenance lease
/// as `holder` (a process-unique id), and while leading rescues expired
/// leases and refreshes the gauges. Steps that an expiry queued are announced
/// through `nudge`. A database outage is counted and logged; the loop goes on
/// and recovers by itself. Gives the lease up on shutdown.
pub async fn run(
    store: Store,
    holder: String,
    every: Duration,
    metrics: Arc<Metrics>,
    nudge: Nudge,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut leading = false;
    // Whether the database answered the last lease renewal: resigning from
    // an unreachable one would only wait out the pool's timeout.
    let mut reachable = true;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        // A tick is abandoned at shutdown: during an outage each of its
        // statements waits out the pool's 5 s acquire timeout, and shutdown
        // waited for four of them. Each statement is its own transaction.
        tokio::select! {
            _ = shutdown.cancelled() => break,
            lead = one_tick(&store, &holder, every, leading, &metrics, &nudge) => {
                reachable = lead.is_some();
                leading = lead.unwrap_or(leading);
            }
        }
    }
    if leading
        && reachable
        && let Err(e) = store.resign_maintenance(&holder).await
    {
        warn!(error = %e, "could not give up queue maintenance; another process leads once the lease expires");
    }
}

/// One maintenance tick: takes or renews the lease, and acts while leading.
/// Returns whether this holder leads now; `None` when the lease could not
/// be renewed or contended for (the database did not answer).
async fn one_tick(
    store: &Store,
    holder: &str,
    every: Duration,
    leading: bool,
    metrics: &Metrics,
    nudge: &Nudge,
) -> Option<bool> {
    let leading = match store.lead_maintenance(holder, every * LEASE_TICKS).await {
        Ok(now_leading) => {
            if now_leading != leading {
                info!(holder = %holder, leading = now_leading, "queue-maintenance leadership changed");
            }
            now_leading
        }
        Err(e) => {
            metrics.dependency_failed(Dependency::database);
            warn!(error = %e, "could not renew or contend for queue maintenance");
            return None;
        }
    };
    if !leading {
        return Some(false);
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
    match store.expire_due_approvals(EXPIRE_BATCH).await {
        Ok(decided) => {
            // `on_timeout: approve` (or a rejection that continues)
            // queued the next step: without this it waited for an idle
            // poll. An extra wake-up only costs one empty claim.
            if !decided.is_empty() {
                nudge.enqueued();
            }
            for d in &decided {
                metrics.observe_approval(d.kind, d.waited_ms);
                info!(
                    run_id = %d.approval.run_id,
                    step = d.approval.step_index,
                    decision = d.kind.as_str(),
                    "approval deadline passed; on_timeout applied"
                );
            }
        }
        Err(e) => {
            metrics.dependency_failed(Dependency::database);
            warn!(error = %e, "could not apply approval deadlines");
        }
    }
    if let Err(e) = store.refresh_queue_stats().await {
        metrics.dependency_failed(Dependency::database);
        warn!(error = %e, "could not refresh the queue gauges");
    }
    Some(true)
}
