//! Prometheus metrics (prometheus-client), served in text format at
//! `GET /api/v2/metrics/prometheus` and `GET /metrics`.
//!
//! Every family is prefixed `vm_` and carries its unit in its name. Labels are
//! bounded: a route *template*, a method, a status class, a step kind, a fixed
//! outcome or dependency name, never an id, a raw path or an error string.
//! Queue depth, oldest-job age and worker heartbeat age are read from the
//! database at scrape time (bounded in time), so they are true across replicas.
//!
//! Families whose label values form a fixed set (dependencies, LLM outcomes,
//! rate-limit scopes, authentication failures, webhook outcomes) are created
//! at zero for every value, so dashboards and alerts see them before the first
//! failure instead of "no data".

use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

/// Route label of a request that matched no route (a 404 from the fallback):
/// the raw path never becomes a label value.
pub const UNMATCHED_ROUTE: &str = "unmatched";

/// Every `outcome` of [`Metrics::observe_llm`].
pub const LLM_OUTCOMES: [&str; 7] = [
    "ok",
    "timeout",
    "unreachable",
    "status_4xx",
    "status_429",
    "status_5xx",
    "invalid_response",
];

/// Every scope of [`Metrics::rate_limited`].
pub const RATE_LIMIT_SCOPES: [&str; 2] = ["address", "key"];

/// Every reason of [`Metrics::auth_failed`].
pub const AUTH_FAILURE_REASONS: [&str; 2] = ["missing", "invalid"];

/// The webhook outcomes created at zero: `accepted` and the rejections a
/// sender can cause. Rarer codes (a database outage) appear when they occur.
pub const WEBHOOK_OUTCOMES: [&str; 11] = [
    "accepted",
    "unknown_webhook_source",
    "address_not_allowed",
    "missing_signature",
    "invalid_signature",
    "invalid_timestamp",
    "invalid_nonce",
    "stale_timestamp",
    "replayed_nonce",
    "payload_too_large",
    "rate_limited",
];

/// The `method` label of a request: a standard method's name, else `other`,
/// so a client inventing methods cannot create label values.
pub fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::TRACE => "TRACE",
        Method::CONNECT => "CONNECT",
        _ => "other",
    }
}

/// `method`, `route`, `status_class` of an HTTP request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    /// HTTP method ([`method_label`]).
    pub method: String,
    /// Route template (`/api/v2/runs/{id}`), or `unmatched` for a 404.
    pub route: String,
    /// `2xx`, `4xx`, `5xx`, …
    pub status_class: String,
}

/// `method`, `route` of an HTTP request (for the latency histogram).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// HTTP method.
    pub method: String,
    /// Route template.
    pub route: String,
}

/// The step kind of a job.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// `template`, `transform`, `delay`, `llm`.
    pub kind: String,
}

/// How a job execution ended.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum JobOutcome {
    /// Result recorded.
    succeeded,
    /// Failed, retry scheduled.
    retried,
    /// Failed for good.
    dead_lettered,
    /// Claim lost or released at shutdown.
    abandoned,
    /// An approval step now waits for a decision (without the worker).
    awaiting_approval,
}

/// Step kind and outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobLabels {
    /// Step kind.
    pub kind: String,
    /// Outcome.
    pub outcome: JobOutcome,
}

/// A dependency of the app.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Dependency {
    /// The relational database.
    database,
    /// Redis.
    redis,
    /// The LLM endpoint.
    llm,
}

/// `dependency` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DependencyLabels {
    /// Which dependency failed.
    pub dependency: Dependency,
}

/// `outcome` of an LLM call: `ok`, `timeout`, `unreachable`, `status_4xx`,
/// `status_5xx`, `status_429`, `invalid_response`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LlmLabels {
    /// Fixed outcome name.
    pub outcome: String,
}

/// Job `state` label for queue gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    /// `waiting`, `queued`, `running`, `dead`.
    pub state: String,
}

/// `threshold` label of `vm_tenant_usage_threshold_total`: a fraction of an
/// allowance from the plans file (`0.8`, `1.0`), a bounded set.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ThresholdLabels {
    /// The threshold, as in the plans file.
    pub threshold: String,
}

/// `meter` label of the usage gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MeterLabels {
    /// `runs`, `steps`, `llm_tokens`, `approval_decisions`.
    pub meter: String,
}

/// `tenant` and `meter` labels of the usage gauges, only with
/// `VM_METRICS_TENANT_LABELS=true` (one series per tenant: unbounded).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantMeterLabels {
    /// The tenant.
    pub tenant: String,
    /// The meter.
    pub meter: String,
}

/// `decision` label of approval decisions: `approved`, `rejected`,
/// `expired_approved`, `expired_rejected`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    /// A [`crate::store::approvals::DecisionKind`] name.
    pub decision: String,
}

fn approval_wait_buckets() -> Histogram {
    // 1 s … 30 days: a decision may take seconds or days.
    Histogram::new([
        1.0,
        10.0,
        60.0,
        300.0,
        900.0,
        3_600.0,
        4.0 * 3_600.0,
        12.0 * 3_600.0,
        86_400.0,
        2.0 * 86_400.0,
        7.0 * 86_400.0,
        30.0 * 86_400.0,
    ])
}

/// `version` label of the build-info gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    /// Crate version.
    pub version: String,
}

fn latency_buckets() -> Histogram {
    // 5 ms … ~41 s.
    Histogram::new(exponential_buckets(0.005, 2.0, 14))
}

/// All metric families of one process.
pub struct Metrics {
    registry: Mutex<Registry>,
    /// HTTP requests by method, route template and status class.
    pub http_requests: Family<HttpLabels, Counter>,
    /// HTTP request latency by method and route template.
    pub http_duration: Family<RouteLabels, Histogram, fn() -> Histogram>,
    /// Jobs claimed by step kind.
    pub jobs_claimed: Family<KindLabels, Counter>,
    /// Time from claimable to claimed, by step kind.
    pub queue_wait: Family<KindLabels, Histogram, fn() -> Histogram>,
    /// Job executions by kind and outcome.
    pub jobs_finished: Family<JobLabels, Counter>,
    /// Job execution time by kind and outcome.
    pub job_duration: Family<JobLabels, Histogram, fn() -> Histogram>,
    /// Jobs whose lease expired and were redelivered or dead-lettered.
    pub jobs_rescued: Counter,
    /// Failures talking to a dependency.
    pub dependency_failures: Family<DependencyLabels, Counter>,
    /// LLM call latency by outcome.
    pub llm_duration: Family<LlmLabels, Histogram, fn() -> Histogram>,
    /// Jobs by state (scrape time).
    pub queue_jobs: Family<StateLabels, Gauge>,
    /// Age of the oldest job by state, seconds (scrape time).
    pub queue_oldest_age: Family<StateLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// Age of the freshest worker heartbeat, seconds (scrape time; -1 when none).
    pub worker_heartbeat_age: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Age of the queue-gauge snapshot the maintenance leader refreshes every
    /// second, seconds (scrape time; -1 before the first snapshot). Growing
    /// means no process leads maintenance: expired leases are not rescued.
    pub queue_snapshot_age: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Requests refused by a rate limit, by scope (`address`, `key`).
    pub rate_limited: Family<ReasonLabels, Counter>,
    /// Failed authentications, by reason (`missing`, `invalid`).
    pub auth_failures: Family<ReasonLabels, Counter>,
    /// Webhook deliveries by outcome (`accepted` or the rejection code).
    pub webhooks: Family<ReasonLabels, Counter>,
    /// Usage of the current period per meter, summed over tenants (scrape time).
    pub usage_used: Family<MeterLabels, Gauge>,
    /// Allowances of the current period per meter, summed over the tenants
    /// with usage on a limited meter (scrape time).
    pub usage_allowance: Family<MeterLabels, Gauge>,
    /// Usage per tenant and meter (only with `VM_METRICS_TENANT_LABELS`).
    pub usage_used_by_tenant: Family<TenantMeterLabels, Gauge>,
    /// Allowance per tenant and meter (only with `VM_METRICS_TENANT_LABELS`).
    pub usage_allowance_by_tenant: Family<TenantMeterLabels, Gauge>,
    /// Whether the usage families are labelled by tenant; `None` until
    /// [`Metrics::register_usage`].
    usage_by_tenant: std::sync::OnceLock<bool>,
    /// Live-update streams ([`crate::stream`]).
    pub stream: crate::stream::metrics::StreamMetrics,
    /// Approval steps waiting for a decision (scrape time, from the
    /// maintenance snapshot).
    pub approvals_pending: Gauge,
    /// How long the oldest pending approval has waited, seconds (scrape
    /// time, from the maintenance snapshot; 0 when none waits).
    pub approval_oldest_pending: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Approval decisions made by this process, by decision.
    pub approval_decisions: Family<DecisionLabels, Counter>,
    /// Time from an approval step starting to wait to its decision.
    pub approval_wait: Histogram,
}

/// A fixed reason, scope or outcome name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// One of a fixed set of names, never free text.
    pub reason: String,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every family under the `vm` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("vm");
        let m = Metrics {
            registry: Mutex::new(Registry::default()),
            http_requests: Family::default(),
            http_duration: Family::new_with_constructor(latency_buckets as fn() -> Histogram),
            jobs_claimed: Family::default(),
            queue_wait: Family::new_with_constructor(latency_buckets as fn() -> Histogram),
            jobs_finished: Family::default(),
            job_duration: Family::new_with_constructor(latency_buckets as fn() -> Histogram),
            jobs_rescued: Counter::default(),
            dependency_failures: Family::default(),
            llm_duration: Family::new_with_constructor(latency_buckets as fn() -> Histogram),
            queue_jobs: Family::default(),
            queue_oldest_age: Family::default(),
            worker_heartbeat_age: Gauge::default(),
            queue_snapshot_age: Gauge::default(),
            rate_limited: Family::default(),
            auth_failures: Family::default(),
            webhooks: Family::default(),
            usage_used: Family::default(),
            usage_allowance: Family::default(),
            usage_used_by_tenant: Family::default(),
            usage_allowance_by_tenant: Family::default(),
            usage_by_tenant: std::sync::OnceLock::new(),
            stream: Default::default(),
            approvals_pending: Gauge::default(),
            approval_oldest_pending: Gauge::default(),
            approval_decisions: Family::default(),
            approval_wait: approval_wait_buckets(),
        };
        registry.register(
            "http_requests",
            "HTTP requests by method, route template and status class",
            m.http_requests.clone(),
        );
        registry.register_with_unit(
            "http_request_duration",
            "HTTP request latency",
            Unit::Seconds,
            m.http_duration.clone(),
        );
        registry.register(
            "jobs_claimed",
            "Jobs claimed by workers, by step kind",
            m.jobs_claimed.clone(),
        );
        registry.register_with_unit(
            "job_queue_wait",
            "Time from a job becoming claimable to its claim, by step kind",
            Unit::Seconds,
            m.queue_wait.clone(),
        );
        registry.register(
            "jobs_finished",
            "Job executions by step kind and outcome",
            m.jobs_finished.clone(),
        );
        registry.register_with_unit(
            "job_duration",
            "Job execution time by step kind and outcome",
            Unit::Seconds,
            m.job_duration.clone(),
        );
        registry.register(
            "jobs_lease_expired",
            "Jobs whose lease expired (worker lost) and were redelivered or dead-lettered",
            m.jobs_rescued.clone(),
        );
        registry.register(
            "dependency_failures",
            "Failed calls to a dependency",
            m.dependency_failures.clone(),
        );
        registry.register_with_unit(
            "llm_request_duration",
            "LLM call latency by outcome",
            Unit::Seconds,
            m.llm_duration.clone(),
        );
        registry.register(
            "queue_jobs",
            "Jobs in the queue by state",
            m.queue_jobs.clone(),
        );
        registry.register_with_unit(
            "queue_oldest_job_age",
            "Age of the oldest job by state",
            Unit::Seconds,
            m.queue_oldest_age.clone(),
        );
        registry.register_with_unit(
            "worker_heartbeat_age",
            "Age of the most recent worker heartbeat (-1: none)",
            Unit::Seconds,
            m.worker_heartbeat_age.clone(),
        );
        registry.register_with_unit(
            "queue_snapshot_age",
            "Age of the queue-gauge snapshot kept by the maintenance leader (-1: none yet)",
            Unit::Seconds,
            m.queue_snapshot_age.clone(),
        );
        registry.register(
            "rate_limited",
            "Requests refused by a rate limit, by scope",
            m.rate_limited.clone(),
        );
        registry.register(
            "auth_failures",
            "Failed API key authentications, by reason",
            m.auth_failures.clone(),
        );
        registry.register(
            "webhook_deliveries",
            "Webhook deliveries by outcome (accepted or rejection code)",
            m.webhooks.clone(),
        );
        registry.register(
            "approvals_pending",
            "Approval steps waiting for a decision",
            m.approvals_pending.clone(),
        );
        registry.register_with_unit(
            "approval_oldest_pending",
            "How long the oldest pending approval has waited (0: none waits)",
            Unit::Seconds,
            m.approval_oldest_pending.clone(),
        );
        registry.register(
            "approval_decisions",
            "Approval decisions by decision (approved, rejected, expired_approved, expired_rejected)",
            m.approval_decisions.clone(),
        );
        registry.register_with_unit(
            "approval_wait",
            "Time from an approval step starting to wait to its decision",
            Unit::Seconds,
            m.approval_wait.clone(),
        );
        let build: Family<BuildLabels, Gauge> = Family::default();
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION").to_string(),
            })
            .set(1);
        registry.register("build_info", "Build information", build);
        m.stream.register(&mut registry);
        m.register_known_labels();
        *m.registry.lock().unwrap_or_else(|p| p.into_inner()) = registry;
        m
    }

    /// Creates every fixed label set at zero.
    fn register_known_labels(&self) {
        for dependency in [Dependency::database, Dependency::redis, Dependency::llm] {
            drop(
                self.dependency_failures
                    .get_or_create(&DependencyLabels { dependency }),
            );
        }
        for outcome in LLM_OUTCOMES {
            drop(self.llm_duration.get_or_create(&LlmLabels {
                outcome: outcome.into(),
            }));
        }
        for (family, values) in [
            (&self.rate_limited, &RATE_LIMIT_SCOPES[..]),
            (&self.auth_failures, &AUTH_FAILURE_REASONS[..]),
            (&self.webhooks, &WEBHOOK_OUTCOMES[..]),
        ] {
            for value in values {
                drop(family.get_or_create(&ReasonLabels {
                    reason: (*value).into(),
                }));
            }
        }
        for kind in crate::store::approvals::DecisionKind::ALL {
            drop(self.approval_decisions.get_or_create(&DecisionLabels {
                decision: kind.as_str().into(),
            }));
        }
    }

    /// Records one approval decision and how long the step waited for it.
    pub fn observe_approval(&self, kind: crate::store::approvals::DecisionKind, waited_ms: i64) {
        self.approval_decisions
            .get_or_create(&DecisionLabels {
                decision: kind.as_str().into(),
            })
            .inc();
        self.approval_wait.observe(waited_ms.max(0) as f64 / 1000.0);
    }

    /// Registers the usage families once: `vm_tenant_usage_threshold_total
    /// {threshold}` (the store's `thresholds` counter, created at zero for
    /// every threshold in `known`), and the gauges `vm_tenant_usage_used` and
    /// `vm_tenant_usage_allowance`, labelled `{meter}`, or `{tenant, meter}`
    /// when `by_tenant`. Later calls do nothing.
    pub fn register_usage(
        &self,
        thresholds: Family<ThresholdLabels, Counter>,
        known: &[String],
        by_tenant: bool,
    ) {
        if self.usage_by_tenant.set(by_tenant).is_err() {
            return;
        }
        for threshold in known {
            drop(thresholds.get_or_create(&ThresholdLabels {
                threshold: threshold.clone(),
            }));
        }
        // The registry carries the `vm` prefix already.
        let mut vm = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        vm.register(
            "tenant_usage_threshold",
            "Warning thresholds of allowances reached (once per tenant, period, meter and threshold)",
            thresholds,
        );
        if by_tenant {
            vm.register(
                "tenant_usage_used",
                "Usage in the current UTC month by tenant and meter",
                self.usage_used_by_tenant.clone(),
            );
            vm.register(
                "tenant_usage_allowance",
                "Allowance in the current UTC month by tenant and meter (limited meters only)",
                self.usage_allowance_by_tenant.clone(),
            );
        } else {
            vm.register(
                "tenant_usage_used",
                "Usage in the current UTC month by meter, summed over tenants",
                self.usage_used.clone(),
            );
            vm.register(
                "tenant_usage_allowance",
                "Allowances in the current UTC month by meter, summed over tenants with usage (limited meters only)",
                self.usage_allowance.clone(),
            );
        }
    }

    /// Sets the usage gauges from `(tenant, meter, used, allowance)` rows of
    /// the current period (previous values are dropped).
    pub fn set_usage(&self, rows: &[(String, crate::plans::Meter, i64, Option<i64>)]) {
        if self.usage_by_tenant.get().copied().unwrap_or(false) {
            self.usage_used_by_tenant.clear();
            self.usage_allowance_by_tenant.clear();
            for (tenant, meter, used, allowance) in rows {
                let labels = TenantMeterLabels {
                    tenant: tenant.clone(),
                    meter: meter.as_str().into(),
                };
                self.usage_used_by_tenant.get_or_create(&labels).set(*used);
                if let Some(a) = allowance {
                    self.usage_allowance_by_tenant
                        .get_or_create(&labels)
                        .set(*a);
                }
            }
        } else {
            self.usage_used.clear();
            self.usage_allowance.clear();
            for meter in crate::plans::Meter::ALL {
                let labels = MeterLabels {
                    meter: meter.as_str().into(),
                };
                let of_meter = rows.iter().filter(|r| r.1 == meter);
                // Saturating: allowances may be as large as i64 allows, and
                // a sum of them must not overflow (a panic, or a negative gauge).
                self.usage_used.get_or_create(&labels).set(
                    of_meter
                        .clone()
                        .fold(0i64, |sum, r| sum.saturating_add(r.2)),
                );
                // Limited meters only: a meter no tenant is limited on has no
                // allowance series (a 0 would read as "used N of 0").
                let allowances = of_meter.filter_map(|r| r.3);
                if let Some(total) = allowances.reduce(i64::saturating_add) {
                    self.usage_allowance.get_or_create(&labels).set(total);
                }
            }
        }
    }

    /// Records one HTTP request. `method` is a [`method_label`] and `route` a
    /// route template or [`UNMATCHED_ROUTE`], never a raw path.
    pub fn observe_http(&self, method: &str, route: &str, status: u16, elapsed: Duration) {
        let status_class = format!("{}xx", status / 100);
        self.http_requests
            .get_or_create(&HttpLabels {
                method: method.to_string(),
                route: route.to_string(),
                status_class,
            })
            .inc();
        self.http_duration
            .get_or_create(&RouteLabels {
                method: method.to_string(),
                route: route.to_string(),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// Records a finished job execution.
    pub fn observe_job(&self, kind: &str, outcome: JobOutcome, elapsed: Duration) {
        let labels = JobLabels {
            kind: kind.to_string(),
            outcome,
        };
        self.jobs_finished.get_or_create(&labels).inc();
        self.job_duration
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
    }

    /// Counts a failed call to `dependency`.
    pub fn dependency_failed(&self, dependency: Dependency) {
        self.dependency_failures
            .get_or_create(&DependencyLabels { dependency })
            .inc();
    }

    /// Records one LLM call.
    pub fn observe_llm(&self, outcome: &str, elapsed: Duration) {
        self.llm_duration
            .get_or_create(&LlmLabels {
                outcome: outcome.to_string(),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// Counts a request refused by the `scope` limit.
    pub fn rate_limited(&self, scope: &'static str) {
        self.rate_limited
            .get_or_create(&ReasonLabels {
                reason: scope.into(),
            })
            .inc();
    }

    /// Counts a failed authentication.
    pub fn auth_failed(&self, reason: &'static str) {
        self.auth_failures
            .get_or_create(&ReasonLabels {
                reason: reason.into(),
            })
            .inc();
    }

    /// Counts a webhook delivery outcome.
    pub fn webhook(&self, outcome: &'static str) {
        self.webhooks
            .get_or_create(&ReasonLabels {
                reason: outcome.into(),
            })
            .inc();
    }

    /// The registry in Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without zero-valued series a family is absent until its first event,
    /// so `rate()` alerts and dashboards show "no data" instead of 0.
    #[test]
    fn families_with_fixed_label_values_are_exported_at_zero_from_the_start() {
        let text = Metrics::new().encode();
        for dependency in ["database", "redis", "llm"] {
            let line = format!("vm_dependency_failures_total{{dependency=\"{dependency}\"}} 0");
            assert!(text.contains(&line), "{line} missing:\n{text}");
        }
        for outcome in LLM_OUTCOMES {
            let line = format!("vm_llm_request_duration_seconds_count{{outcome=\"{outcome}\"}} 0");
            assert!(text.contains(&line), "{line} missing:\n{text}");
        }
        for (family, values) in [
            ("vm_rate_limited_total", &RATE_LIMIT_SCOPES[..]),
            ("vm_auth_failures_total", &AUTH_FAILURE_REASONS[..]),
            ("vm_webhook_deliveries_total", &WEBHOOK_OUTCOMES[..]),
        ] {
            for value in values {
                let line = format!("{family}{{reason=\"{value}\"}} 0");
                assert!(text.contains(&line), "{line} missing:\n{text}");
            }
        }
        for kind in crate::store::approvals::DecisionKind::ALL {
            let line = format!(
                "vm_approval_decisions_total{{decision=\"{}\"}} 0",
                kind.as_str()
            );
            assert!(text.contains(&line), "{line} missing:\n{text}");
        }
    }

    #[test]
    fn invented_methods_share_one_label_value() {
        let custom = axum::http::Method::from_bytes(b"BREW").expect("a token");
        assert_eq!(method_label(&custom), "other");
        assert_eq!(method_label(&axum::http::Method::DELETE), "DELETE");
    }
}
