//! Leader election through a `coordination.k8s.io/v1` Lease (kube-lease-manager), so two
//! operator replicas never both write. Only the holder runs the controller; a replica that
//! loses the Lease stops its controller and exits, and Kubernetes restarts it as a standby
//! (a clean process is simpler to trust than a controller resumed after a split).

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::{Api, Client};
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

/// What one look at the Lease found.
#[derive(Debug)]
pub enum Read {
    /// The Lease as the API server returned it.
    Lease(Box<Lease>),
    /// The Lease does not exist.
    Missing,
    /// The request failed or timed out (renewals are probably failing too).
    Failed,
}

/// Whether this replica may keep writing, and until when.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    /// Leading until the deadline, unless a later read extends it.
    Until(Timestamp),
    /// No longer the leader: stop now.
    Lost,
}

/// The local deadline after one look at the Lease: the holder's last renewal plus the lease
/// duration, less `margin`. `renewTime` was written by this process with this clock, so it
/// is comparable with `now`. A failed read keeps the previous deadline, so a replica whose
/// renewals fail or hang stops on its own before another one can take the Lease (the Lease
/// manager's watch channel never reports that case).
pub fn standing(
    previous: Timestamp,
    read: &Read,
    identity: &str,
    margin: Duration,
    now: Timestamp,
) -> Standing {
    let deadline = match read {
        Read::Failed => previous,
        Read::Missing => return Standing::Lost,
        Read::Lease(lease) => {
            let Some(spec) = lease.spec.as_ref() else {
                return Standing::Lost;
            };
            if spec.holder_identity.as_deref() != Some(identity) {
                return Standing::Lost;
            }
            let (Some(renewed), Some(seconds)) =
                (spec.renew_time.as_ref(), spec.lease_duration_seconds)
            else {
                return Standing::Lost;
            };
            let valid = SignedDuration::from_secs(i64::from(seconds))
                - SignedDuration::try_from(margin).unwrap_or(SignedDuration::ZERO);
            renewed.0.checked_add(valid).unwrap_or(previous)
        }
    };
    if now >= deadline {
        Standing::Lost
    } else {
        Standing::Until(deadline)
    }
}

/// Margin kept before the Lease expires: one check interval plus one read timeout (so the
/// check itself cannot notice too late), but never more than half the renewal grace, so a
/// renewal that needs a few retries still lands before the deadline.
pub fn margin(config: &LeaseConfig) -> Duration {
    let wanted = READ_TIMEOUT + CHECK_EVERY;
    let cap = Duration::from_secs((config.grace_seconds / 2).max(1));
    wanted.min(cap)
}

/// Interval of the deadline check.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Resolves when this replica must stop leading: the Lease names another holder or is gone,
/// or no successful renewal was seen before the local deadline. Checks every second; each
/// read has a short timeout so a hung API server cannot stall the check itself.
pub async fn deadline_passed(client: Client, config: LeaseConfig) {
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    let margin = margin(&config);
    let duration = Duration::from_secs(config.duration_seconds).saturating_sub(margin);
    // Just acquired: valid for a whole lease duration from now.
    let mut deadline = Timestamp::now()
        .checked_add(SignedDuration::try_from(duration).unwrap_or(SignedDuration::ZERO))
        .unwrap_or_else(|_| Timestamp::now());
    loop {
        // The deadline is watched while waiting and while reading, so a hung read
        // cannot make this replica notice too late.
        let remaining =
            Duration::try_from(deadline.duration_since(Timestamp::now())).unwrap_or(Duration::ZERO);
        let step = async {
            tokio::time::sleep(CHECK_EVERY).await;
            tokio::time::timeout(READ_TIMEOUT, api.get_opt(&config.name)).await
        };
        let outcome = tokio::select! {
            _ = tokio::time::sleep(remaining) => {
                tracing::warn!("leader Lease not renewed before the local deadline");
                return;
            }
            outcome = step => outcome,
        };
        let read = match outcome {
            Ok(Ok(Some(lease))) => Read::Lease(Box::new(lease)),
            Ok(Ok(None)) => Read::Missing,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot read the leader Lease");
                Read::Failed
            }
            Err(_) => {
                tracing::warn!("reading the leader Lease timed out");
                Read::Failed
            }
        };
        match standing(deadline, &read, &config.identity, margin, Timestamp::now()) {
            Standing::Until(d) => deadline = d,
            Standing::Lost => {
                tracing::warn!(
                    ?read,
                    "leader Lease not renewed in time or held by another replica"
                );
                return;
            }
        }
    }
}

/// Timeout of each request the election makes (lease client and the deadline check).
pub const READ_TIMEOUT: Duration = Duration::from_secs(3);

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + s).expect("timestamp")
    }

    fn lease(holder: &str, renewed: i64) -> Read {
        Read::Lease(Box::new(Lease {
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.into()),
                renew_time: Some(MicroTime(at(renewed))),
                lease_duration_seconds: Some(15),
                ..LeaseSpec::default()
            }),
            ..Lease::default()
        }))
    }

    const MARGIN: Duration = Duration::from_secs(2);

    #[test]
    fn a_renewal_moves_the_deadline_to_renew_time_plus_duration_less_margin() {
        assert_eq!(
            standing(at(13), &lease("me", 10), "me", MARGIN, at(11)),
            Standing::Until(at(23))
        );
    }

    #[test]
    fn failing_renewals_stop_the_leader_before_the_lease_expires() {
        // Without this the old leader kept reconciling after its Lease had expired and
        // another replica had taken it, whenever renewals failed or hung.
        let mut deadline = at(13);
        let mut now = at(1);
        while let Standing::Until(d) = standing(deadline, &Read::Failed, "me", MARGIN, now) {
            deadline = d;
            now += SignedDuration::from_secs(1);
        }
        assert_eq!(
            now,
            at(13),
            "stops at the deadline, two seconds before expiry at 15"
        );
    }

    #[test]
    fn another_holder_or_a_missing_lease_is_lost_at_once() {
        assert_eq!(
            standing(at(13), &lease("other", 10), "me", MARGIN, at(11)),
            Standing::Lost
        );
        assert_eq!(
            standing(at(13), &Read::Missing, "me", MARGIN, at(11)),
            Standing::Lost
        );
    }

    #[test]
    fn a_stale_renew_time_is_lost_even_while_reads_succeed() {
        assert_eq!(
            standing(at(13), &lease("me", 0), "me", MARGIN, at(14)),
            Standing::Lost
        );
    }

    #[test]
    fn with_the_default_lease_a_renewal_has_six_seconds_for_retries() {
        // Duration 15 s, renewal a third of the way in (grace 10 s): the deadline is
        // renew + 15 s - 4 s, so a renewal due at +5 s may retry until +11 s.
        let config = LeaseConfig {
            namespace: "ns".into(),
            name: "lease".into(),
            identity: "me".into(),
            duration_seconds: 15,
            grace_seconds: 10,
        };
        assert_eq!(margin(&config), Duration::from_secs(4));
        let short = LeaseConfig {
            duration_seconds: 6,
            grace_seconds: 4,
            ..config
        };
        assert_eq!(
            margin(&short),
            Duration::from_secs(2),
            "never more than half the grace"
        );
    }

    #[test]
    fn the_margin_leaves_room_for_the_normal_renewal() {
        let config = LeaseConfig {
            namespace: "ns".into(),
            name: "l".into(),
            identity: "me".into(),
            duration_seconds: 15,
            grace_seconds: 5,
        };
        assert!(margin(&config) < Duration::from_secs(config.grace_seconds));
    }
}
