//! Prometheus metrics of the controller, registered under the `vm_operator` prefix:
//!
//! - `vm_operator_reconciles_total` — reconcile passes;
//! - `vm_operator_reconcile_errors_total{reason}` — failed passes by a fixed reason label;
//! - `vm_operator_reconcile_duration_seconds` — histogram of pass durations;
//! - `vm_operator_managed_objects` — `VmWebapp` resources seen by the controller;
//! - `vm_operator_child_writes_total{kind}` — server-side applies and deletes of children;
//! - `vm_operator_refused_writes_total{kind}` — child writes the API server refused with a
//!   4xx answer (quota, admission, validation), each also reported in the `VmWebapp`'s status
//!   as `Degraded=True, reason=ApplyFailed` and a Warning event;
//! - `vm_operator_status_writes_total` — writes of `VmWebapp` status (zero in a steady state);
//! - `vm_operator_api_reads_total{kind}` — GETs a pass had to make because a cache could not
//!   answer (a Secret whose data changed); zero with warm caches;
//! - `vm_operator_vmwebapp_conditions{condition,status,reason}` — `VmWebapp` resources in the
//!   controller's cache by condition type, status and reason (so alerts can see, for example,
//!   `Degraded=True, reason=MigrationFailed` without kube-state-metrics). The controller
//!   keeps it current by calling [`Metrics::observe_conditions`] with its cache every 5 s.
//! - `vm_operator_backups_configured` — `VmWebapp` resources with `spec.backup`;
//! - `vm_operator_backups_stale` — those whose last successful backup (or, before the first
//!   success, the creation of their backup CronJob) is older than their schedule allows
//!   (`status.backup.maxAgeSeconds`); recounted with the conditions every 5 s, so the
//!   `VmWebappBackupStale` alert needs no per-object label.
//!
//! Labels are bounded: never an object name, an id or an error string.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::AtomicI64;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::consts::{condition, reason};
use crate::crd::VmWebappStatus;

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

/// Labels of the condition gauge; every value comes from a fixed set.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct ConditionLabels {
    /// `Ready`, `Progressing` or `Degraded`.
    pub condition: &'static str,
    /// `True`, `False` or `Unknown`.
    pub status: &'static str,
    /// A reason from `consts::reason`, `NotReported` when the resource has no such condition
    /// yet, or `Other`.
    pub reason: &'static str,
}

/// Condition types the gauge reports, each with every reason it may carry.
const CONDITIONS: [&str; 3] = [
    condition::READY,
    condition::PROGRESSING,
    condition::DEGRADED,
];
const REASONS: [&str; 11] = [
    reason::AVAILABLE,
    reason::ROLLING_OUT,
    reason::MIGRATION_RUNNING,
    reason::MIGRATION_FAILED,
    reason::SECRET_MISSING,
    reason::INVALID_SPEC,
    reason::SUSPENDED,
    reason::AS_EXPECTED,
    reason::RECONCILED,
    reason::APPLY_FAILED,
    reason::API_ERRORS,
];

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
    /// Child writes the API server refused, by kind.
    pub refused: Family<KindLabels, Counter>,
    /// Status writes.
    pub status_writes: Counter,
    /// GETs made by passes, by kind.
    pub reads: Family<KindLabels, Counter>,
    /// `VmWebapp` resources by condition, status and reason.
    pub conditions: Family<ConditionLabels, Gauge<i64, AtomicI64>>,
    /// `VmWebapp` resources with `spec.backup`.
    pub backups_configured: Gauge<i64, AtomicI64>,
    /// Those whose last successful backup is older than their schedule allows.
    pub backups_stale: Gauge<i64, AtomicI64>,
    /// Label sets written to `conditions` so far, zeroed when no resource carries them.
    conditions_seen: Arc<Mutex<BTreeSet<ConditionLabels>>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            reconciles: Counter::default(),
            errors: Family::default(),
            duration: Histogram::new(exponential_buckets(0.005, 2.0, 12)),
            managed: Gauge::default(),
            writes: Family::default(),
            refused: Family::default(),
            status_writes: Counter::default(),
            reads: Family::default(),
            conditions: Family::default(),
            backups_configured: Gauge::default(),
            backups_stale: Gauge::default(),
            conditions_seen: Arc::default(),
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
        registry.register(
            "refused_writes",
            "Child writes the API server refused (4xx), by kind",
            m.refused.clone(),
        );
        registry.register(
            "status_writes",
            "Writes of VmWebapp status",
            m.status_writes.clone(),
        );
        registry.register(
            "api_reads",
            "GETs reconcile passes made because a cache could not answer, by kind",
            m.reads.clone(),
        );
        registry.register(
            "vmwebapp_conditions",
            "VmWebapp resources by condition type, status and reason",
            m.conditions.clone(),
        );
        registry.register(
            "backups_configured",
            "VmWebapp resources with scheduled backups",
            m.backups_configured.clone(),
        );
        registry.register(
            "backups_stale",
            "VmWebapp resources whose last successful backup is older than their schedule allows",
            m.backups_stale.clone(),
        );
        m
    }

    /// Recount `vm_operator_backups_configured` and `vm_operator_backups_stale` from the
    /// statuses of every `VmWebapp` in the cache, at `now`. A backup status without a
    /// success counts from `configuredTime` (when its CronJob was created), so backups
    /// that never succeed turn stale too; one without either is not judged yet.
    pub fn observe_backups<'a>(
        &self,
        statuses: impl IntoIterator<Item = Option<&'a VmWebappStatus>>,
        now: k8s_openapi::jiff::Timestamp,
    ) {
        let (mut configured, mut stale) = (0, 0);
        for backup in statuses
            .into_iter()
            .flatten()
            .filter_map(|s| s.backup.as_ref())
        {
            configured += 1;
            let since = backup
                .last_successful_time
                .as_deref()
                .or(backup.configured_time.as_deref())
                .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok());
            if let (Some(since), Some(max)) = (since, backup.max_age_seconds)
                && now.as_second() - since.as_second() > max
            {
                stale += 1;
            }
        }
        self.backups_configured.set(configured);
        self.backups_stale.set(stale);
    }

    /// Recount `vm_operator_vmwebapp_conditions` from the statuses of every `VmWebapp` in
    /// the cache (`None`: not reconciled yet). A resource without a condition counts as
    /// `status="Unknown", reason="NotReported"`, so a resource the operator never reached
    /// still shows up as not ready. Label sets no resource carries any more drop to 0.
    pub fn observe_conditions<'a>(
        &self,
        statuses: impl IntoIterator<Item = Option<&'a VmWebappStatus>>,
    ) {
        let mut counts: BTreeMap<ConditionLabels, i64> = BTreeMap::new();
        for status in statuses {
            for type_ in CONDITIONS {
                let found = status.and_then(|s| s.conditions.iter().find(|c| c.type_ == type_));
                let labels = match found {
                    Some(c) => ConditionLabels {
                        condition: type_,
                        status: match c.status.as_str() {
                            "True" => "True",
                            "False" => "False",
                            _ => "Unknown",
                        },
                        reason: REASONS
                            .iter()
                            .find(|r| **r == c.reason)
                            .copied()
                            .unwrap_or("Other"),
                    },
                    None => ConditionLabels {
                        condition: type_,
                        status: "Unknown",
                        reason: "NotReported",
                    },
                };
                *counts.entry(labels).or_insert(0) += 1;
            }
        }
        let mut seen = self
            .conditions_seen
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for labels in seen.iter() {
            if !counts.contains_key(labels) {
                self.conditions.get_or_create(labels).set(0);
            }
        }
        for (labels, n) in counts {
            self.conditions.get_or_create(&labels).set(n);
            seen.insert(labels);
        }
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

    /// The `VmWebappBackupStale` alert is `vm_operator_backups_stale > 0`: a backup that
    /// never succeeds must count too, or a broken CronJob stays silent forever.
    #[test]
    fn backups_older_than_their_schedule_allows_count_as_stale() {
        use crate::crd::BackupStatus;
        let status = |success: Option<&str>, configured: &str| VmWebappStatus {
            backup: Some(BackupStatus {
                last_successful_time: success.map(str::to_owned),
                configured_time: Some(configured.to_owned()),
                max_age_seconds: Some(90_000),
                ..BackupStatus::default()
            }),
            ..VmWebappStatus::default()
        };
        let fresh = status(Some("2025-06-01T02:30:00Z"), "2025-01-01T00:00:00Z");
        let old = status(Some("2025-05-30T02:30:00Z"), "2025-01-01T00:00:00Z");
        let never_new = status(None, "2025-06-01T00:00:00Z");
        let never_old = status(None, "2025-05-01T00:00:00Z");
        let none = VmWebappStatus::default();
        let m = Metrics::default();
        let now: k8s_openapi::jiff::Timestamp = "2025-06-01T12:00:00Z".parse().expect("time");
        m.observe_backups(
            [
                Some(&fresh),
                Some(&old),
                Some(&never_new),
                Some(&never_old),
                Some(&none),
                None,
            ],
            now,
        );
        assert_eq!(m.backups_configured.get(), 4);
        assert_eq!(m.backups_stale.get(), 2);
    }

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

    fn status(conditions: &[(&str, &str, &str)]) -> VmWebappStatus {
        let conditions: Vec<serde_json::Value> = conditions
            .iter()
            .map(|(t, s, r)| {
                serde_json::json!({"type": t, "status": s, "reason": r, "message": "",
                    "lastTransitionTime": "2024-01-01T00:00:00Z"})
            })
            .collect();
        serde_json::from_value(serde_json::json!({ "conditions": conditions })).expect("status")
    }

    #[test]
    fn conditions_are_counted_by_type_status_and_reason_and_cleared_when_gone() {
        let mut r = registry();
        let m = Metrics::register(&mut r);
        let failed = status(&[
            ("Ready", "True", "Available"),
            ("Degraded", "True", "MigrationFailed"),
            ("Progressing", "False", "free text is never a label"),
        ]);
        let healthy = status(&[("Ready", "True", "Available")]);
        m.observe_conditions([Some(&failed), Some(&healthy), None]);
        let text = encode(&r).expect("encodes");
        for line in [
            r#"vm_operator_vmwebapp_conditions{condition="Ready",status="True",reason="Available"} 2"#,
            r#"vm_operator_vmwebapp_conditions{condition="Ready",status="Unknown",reason="NotReported"} 1"#,
            r#"vm_operator_vmwebapp_conditions{condition="Degraded",status="True",reason="MigrationFailed"} 1"#,
            r#"vm_operator_vmwebapp_conditions{condition="Progressing",status="False",reason="Other"} 1"#,
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
        // The failed migration is fixed: its series drops to 0 instead of staying stale.
        m.observe_conditions([Some(&healthy)]);
        let text = encode(&r).expect("encodes");
        assert!(
            text.contains(r#"vm_operator_vmwebapp_conditions{condition="Degraded",status="True",reason="MigrationFailed"} 0"#),
            "{text}"
        );
    }

    /// Without this, an alert, SLO or runbook could query an operator metric that does not
    /// exist (a typo, a rename) and never fire, silently.
    #[test]
    fn every_operator_metric_named_in_the_alerts_and_docs_exists() {
        let mut r = registry();
        let m = Metrics::register(&mut r);
        drop(m.start());
        m.errors
            .get_or_create(&ErrorLabels { reason: "kube_api" })
            .inc();
        m.writes
            .get_or_create(&KindLabels { kind: "Deployment" })
            .inc();
        m.refused
            .get_or_create(&KindLabels { kind: "Deployment" })
            .inc();
        m.reads.get_or_create(&KindLabels { kind: "Secret" }).inc();
        m.observe_conditions([None]);
        let text = encode(&r).expect("encodes");
        let families: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .collect();
        let exists = |name: &str| {
            families.iter().any(|f| {
                name == *f
                    || ["_total", "_bucket", "_count", "_sum", "_created"]
                        .iter()
                        .any(|suffix| name.strip_suffix(suffix) == Some(f))
            })
        };
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut files = vec![
            root.join("deploy/prometheus-rules.yaml"),
            root.join("docs/slo.md"),
        ];
        for dir in ["docs/runbooks", "docs"] {
            for entry in std::fs::read_dir(root.join(dir)).expect("docs exist") {
                let path = entry.expect("entry").path();
                if path.extension().is_some_and(|e| e == "md") {
                    files.push(path);
                }
            }
        }
        let mut checked = 0;
        for file in files {
            let doc = std::fs::read_to_string(&file).expect("readable");
            let mut rest = doc.as_str();
            while let Some(at) = rest.find("vm_operator_") {
                let tail = &rest[at..];
                let end = tail
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(tail.len());
                let name = &tail[..end];
                assert!(
                    exists(name),
                    "{} names {name}, which the operator does not export; families: {families:?}",
                    file.display()
                );
                checked += 1;
                rest = &tail[end..];
            }
        }
        assert!(checked > 0, "the alerts name no operator metric");
    }
}
