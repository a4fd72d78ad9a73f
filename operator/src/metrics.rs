//! Prometheus metrics of the controller, registered under the `vm_operator` prefix:
//!
//! - `vm_operator_reconciles_total` — reconcile passes;
//! - `vm_operator_reconcile_errors_total{reason}` — failed passes by a fixed reason label;
//! - `vm_operator_reconcile_duration_seconds` — histogram of pass durations;
//! - `vm_operator_managed_objects` — `VmWebapp` resources seen by the controller;
//! - `vm_operator_child_writes_total{kind}` — server-side applies and deletes of children.
//!
//! Labels are bounded: never an object name, an id or an error string.

use std::sync::atomic::AtomicI64;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label of the error counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// A fixed reason, see `controller::Error::metric_label`.
    pub reason: &'static str,
}

/// Label of the write counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// Kind of the child written.
    pub kind: &'static str,
}

/// The controller's metric families.
#[derive(Clone, Debug)]
pub struct Metrics {
    /// Reconcile passes.
    pub reconciles: Counter,
    /// Failed passes by reason.
    pub errors: Family<ErrorLabels, Counter>,
    /// Pass durations.
    pub duration: Histogram,
    /// `VmWebapp` resources in the controller's cache.
    pub managed: Gauge<i64, AtomicI64>,
    /// Child writes by kind.
    pub writes: Family<KindLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            reconciles: Counter::default(),
            errors: Family::default(),
            duration: Histogram::new(exponential_buckets(0.005, 2.0, 12)),
            managed: Gauge::default(),
            writes: Family::default(),
        }
    }
}

impl Metrics {
    /// Create the families and register them in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register("reconciles", "Reconcile passes", m.reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Failed reconcile passes by reason",
            m.errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Duration of reconcile passes",
            m.duration.clone(),
        );
        registry.register(
            "managed_objects",
            "VmWebapp resources seen by the controller",
            m.managed.clone(),
        );
        registry.register(
            "child_writes",
            "Server-side applies and deletes of children by kind",
            m.writes.clone(),
        );
        m
    }

    /// Start timing a pass; the duration is recorded when the guard drops.
    pub fn start(&self) -> PassTimer<'_> {
        self.reconciles.inc();
        PassTimer {
            metrics: self,
            start: Instant::now(),
        }
    }
}

/// Records a pass duration on drop.
pub struct PassTimer<'a> {
    metrics: &'a Metrics,
    start: Instant,
}

impl Drop for PassTimer<'_> {
    fn drop(&mut self) {
        self.metrics
            .duration
            .observe(self.start.elapsed().as_secs_f64());
    }
}

/// A registry with the operator's prefix.
pub fn registry() -> Registry {
    Registry::with_prefix("vm_operator")
}

/// Encode `registry` in the Prometheus text format.
pub fn encode(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registered_families_appear_with_prefix_and_units() {
        let mut r = registry();
        let m = Metrics::register(&mut r);
        drop(m.start());
        m.errors
            .get_or_create(&ErrorLabels { reason: "kube_api" })
            .inc();
        let text = encode(&r).expect("encodes");
        assert!(text.contains("vm_operator_reconciles_total 1"), "{text}");
        assert!(
            text.contains("vm_operator_reconcile_errors_total{reason=\"kube_api\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("vm_operator_reconcile_duration_seconds_count 1"),
            "{text}"
        );
        assert!(text.contains("vm_operator_managed_objects"), "{text}");
    }
}
