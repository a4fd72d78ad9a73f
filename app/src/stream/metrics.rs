//! Metrics of live streams: open subscribers, streams ended or refused,
//! subscribers that fell behind and continued from the database, and event
//! ids given up on behind a gap. Labels are fixed reasons.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::metrics::ReasonLabels;

/// Every `reason` of `vm_stream_drops_total`: `limit` (a stream refused at
/// the per-process or per-key limit), `shutdown` (streams ended by a graceful
/// stop), `stalled` (a stream ended because a write to its client made no
/// progress for `VM_STREAM_WRITE_TIMEOUT_MS`: a client that stopped
/// reading). A subscriber that falls behind is not dropped: see
/// [`StreamMetrics::lagged`]; nor is a run's stream that ended with its run.
pub const DROP_REASONS: [&str; 3] = ["limit", "shutdown", "stalled"];

/// The families of [`crate::stream`].
#[derive(Default)]
pub struct StreamMetrics {
    /// Open SSE streams in this process.
    pub subscribers: Gauge,
    /// Streams ended or refused, by reason ([`DROP_REASONS`]).
    pub drops: Family<ReasonLabels, Counter>,
    /// Times a subscriber fell a whole buffer behind and continued from the
    /// database on the same stream.
    pub lagged: Counter,
    /// Event ids the hub stopped waiting for after the gap timeout.
    pub gaps_given_up: Counter,
}

impl StreamMetrics {
    /// Registers the families (under the registry's `vm` prefix) and creates
    /// every reason at zero.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "stream_subscribers",
            "Open live-update (SSE) streams in this process",
            self.subscribers.clone(),
        );
        registry.register(
            "stream_drops",
            "Live-update streams ended or refused, by reason (limit, shutdown, stalled)",
            self.drops.clone(),
        );
        registry.register(
            "stream_lagged",
            "Times a live-update subscriber fell a whole buffer behind and continued from the database on the same stream",
            self.lagged.clone(),
        );
        registry.register(
            "stream_gap_ids_given_up",
            "Event ids the live-update poller stopped waiting for after the gap timeout",
            self.gaps_given_up.clone(),
        );
        for reason in DROP_REASONS {
            drop(self.drops.get_or_create(&ReasonLabels {
                reason: reason.into(),
            }));
        }
    }

    /// Counts one stream dropped or refused for `reason` (one of [`DROP_REASONS`]).
    pub fn dropped(&self, reason: &'static str) {
        self.drops
            .get_or_create(&ReasonLabels {
                reason: reason.into(),
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Alerts on `rate(vm_stream_drops_total[5m])` and the dashboard's
    /// lagged rate see 0, not "no data", before the first drop or lag.
    #[test]
    fn every_drop_reason_the_lagged_counter_and_the_gauge_are_exported_at_zero_from_the_start() {
        let text = crate::metrics::Metrics::new().encode();
        for reason in DROP_REASONS {
            let line = format!("vm_stream_drops_total{{reason=\"{reason}\"}} 0");
            assert!(text.contains(&line), "{line} missing:\n{text}");
        }
        assert!(text.contains("vm_stream_subscribers 0"), "{text}");
        assert!(
            text.contains("vm_stream_gap_ids_given_up_total 0"),
            "{text}"
        );
        assert!(text.contains("vm_stream_lagged_total 0"), "{text}");
        // A subscriber that falls behind is no longer a drop.
        assert!(!text.contains("reason=\"slow\""), "{text}");
    }
}
