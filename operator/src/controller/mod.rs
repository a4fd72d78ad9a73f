//! The reconcile loop, split by concern:
//!
//! - `pass`: one pass over one `VmWebapp` (the orchestration below);
//! - `caches`: reflector caches the pass reads instead of making GETs;
//! - `apply`: server-side apply of what differs, deletes, refused writes;
//! - [`drift`]: whether a live child already carries the desired fields;
//! - `migration`: the migration Job that gates a new image;
//! - [`replicas`]: who owns `spec.replicas`, and when a write is a rollout;
//! - `events`: the events a person should see;
//! - [`error`]: what fails a pass (retried with backoff) and what is a refusal (reported);
//! - `watch`: the watches that feed the caches and trigger passes.
//!
//! Requests of one pass, in order (the mocked-API tests assert exactly this). With warm
//! caches a pass makes no GET at all:
//! 1. `GET` of a referenced Secret only when its `resourceVersion` moved since it was read;
//! 2. unless suspended or blocked: `PATCH` (server-side apply) of the ServiceAccount,
//!    ConfigMap and Service that differ from the cache, in parallel; the migration Job
//!    when `spec.image` is not serving yet; then the Deployments, PodDisruptionBudgets and
//!    HPAs that differ, in parallel (`DELETE` of an HPA no longer asked for);
//! 3. one Normal `Applied` event when something was written;
//! 4. `PATCH` of the status subresource when the status changed;
//! 5. events for condition transitions (Warning when Degraded turns on or changes).
//!
//! A write the API server refuses with a 4xx does not fail the pass: the status says
//! `Degraded=True, reason=ApplyFailed` with the child and the server's message, a Warning
//! event follows, and the pass is retried with backoff until the write succeeds (which
//! clears the condition). Transport errors, 5xx and 429 fail the pass (retried with
//! backoff); from the third failure in a row the status says `reason=ApiErrors`.

mod apply;
mod caches;
pub mod drift;
pub mod error;
mod events;
mod migration;
mod pass;
pub mod replicas;
mod watch;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::runtime::events::{Recorder, Reporter};
use kube::{Client, ResourceExt};
use tracing::{Instrument, field, info_span, warn};

pub use caches::{Caches, Referenced, Writers};
pub use drift::{is_subset, same_quantity};
pub use error::{Error, Refusal};
pub use replicas::manages_replicas;
pub use watch::run;

#[cfg(test)]
pub(crate) use caches::slim as caches_slim;

use crate::consts;
use crate::crd::VmWebapp;
use crate::metrics::{ErrorLabels, Metrics};

/// Failed passes in a row after which the status reports them (`reason=ApiErrors`).
pub const REPORT_FAILURES_AFTER: u32 = 3;

/// State shared by every reconcile pass.
pub struct Context {
    /// API client.
    pub client: Client,
    /// Event recorder (deduplicates repeated events into series).
    pub recorder: Recorder,
    /// Metric families.
    pub metrics: Metrics,
    /// Consecutive failures per object (`namespace/name`), for exponential backoff; reset on
    /// success, pruned when the object goes away.
    pub failures: Mutex<HashMap<String, u32>>,
    /// Clock for condition transition times (fixed in tests).
    pub now: fn() -> Timestamp,
    /// Reconciles running at once.
    pub concurrency: u16,
    /// What the passes read.
    pub caches: Caches,
    /// The caches' write side, taken by [`run`].
    writers: Mutex<Option<Writers>>,
}

impl Context {
    /// A context with the real clock.
    pub fn new(client: Client, metrics: Metrics) -> Self {
        let reporter = Reporter {
            controller: consts::CONTROLLER_NAME.into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Self::with_parts(client, metrics, reporter, Timestamp::now)
    }

    /// A context from its parts (tests use a fixed clock).
    pub fn with_parts(
        client: Client,
        metrics: Metrics,
        reporter: Reporter,
        now: fn() -> Timestamp,
    ) -> Self {
        let (caches, writers) = Caches::new();
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            failures: Mutex::new(HashMap::new()),
            now,
            concurrency: 4,
            caches,
            writers: Mutex::new(Some(writers)),
        }
    }

    /// Set how many reconciles run at once.
    pub fn with_concurrency(mut self, concurrency: u16) -> Self {
        self.concurrency = concurrency.max(1);
        self
    }

    /// The caches' write side; `None` once taken.
    pub fn take_writers(&self) -> Option<Writers> {
        self.writers.lock().ok().and_then(|mut w| w.take())
    }

    fn reset_failures(&self, key: &str) {
        if let Ok(mut f) = self.failures.lock() {
            f.remove(key);
        }
    }

    /// Consecutive failures recorded for `key`.
    pub fn failure_count(&self, key: &str) -> u32 {
        self.failures
            .lock()
            .ok()
            .and_then(|f| f.get(key).copied())
            .unwrap_or(0)
    }

    /// Drop the failure counts of objects for which `exists` is false.
    pub fn prune_failures(&self, exists: impl Fn(&str) -> bool) {
        if let Ok(mut f) = self.failures.lock()
            && !f.is_empty()
        {
            f.retain(|key, _| exists(key));
        }
    }

    /// Record a failure of `key` and return how long to wait before the next try:
    /// 5 s, 10 s, 20 s … capped at 5 minutes.
    pub fn backoff(&self, key: &str) -> Duration {
        let n = match self.failures.lock() {
            Ok(mut f) => {
                let n = f.entry(key.to_owned()).or_insert(0);
                *n = n.saturating_add(1);
                *n
            }
            Err(_) => 1,
        };
        let secs = 5u64.saturating_mul(1u64 << n.saturating_sub(1).min(6));
        Duration::from_secs(secs.min(300))
    }
}

fn key(app: &VmWebapp) -> String {
    format!("{}/{}", app.namespace().unwrap_or_default(), app.name_any())
}

/// Reconcile one `VmWebapp`.
pub async fn reconcile(app: Arc<VmWebapp>, ctx: Arc<Context>) -> Result<Action, Error> {
    let span = info_span!("reconcile", namespace = field::Empty, name = %app.name_any(), generation = app.metadata.generation);
    if let Some(ns) = app.namespace() {
        span.record("namespace", ns);
    }
    async {
        if ctx.caches.ready().await.is_err() {
            // Only at shutdown: the watches that feed the caches have gone.
            return Ok(Action::await_change());
        }
        let _timer = ctx.metrics.start();
        let key = key(&app);
        let mut pass = pass::Pass::new(&app, &ctx)?;
        let result = pass.run().await;
        match &result {
            Ok(_) if pass.was_refused() => {
                ctx.metrics
                    .errors
                    .get_or_create(&ErrorLabels {
                        reason: "api_refused",
                    })
                    .inc();
            }
            Ok(_) => ctx.reset_failures(&key),
            Err(e) if ctx.failure_count(&key) + 1 >= REPORT_FAILURES_AFTER => {
                pass.report_api_errors(e).await;
            }
            Err(_) => {}
        }
        result
    }
    .instrument(span)
    .await
}

/// Decide when to retry after an error: per-object exponential backoff.
pub fn error_policy(app: Arc<VmWebapp>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .errors
        .get_or_create(&ErrorLabels {
            reason: error.metric_label(),
        })
        .inc();
    let delay = ctx.backoff(&key(&app));
    warn!(name = %app.name_any(), error = %error, retry_in_s = delay.as_secs(), "reconcile failed");
    Action::requeue(delay)
}
