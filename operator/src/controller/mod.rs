//! The reconcile loop: for one `VmWebapp`, read what exists (referenced Secrets, children),
//! decide the image the Deployments may run (migration gating), apply every child that
//! differs from the builders' output with server-side apply, write the status when it
//! changed, and publish events for what a person should see.
//!
//! Requests of one pass, in order (the mocked-API tests assert exactly this):
//! 1. `GET` each referenced Secret (sorted by name);
//! 2. `GET` the API and worker Deployments;
//! 3. unless suspended or blocked: `GET` (and `PATCH` if different) ServiceAccount,
//!    ConfigMap, Service; the migration Job when `spec.image` is not serving yet; the
//!    Deployments (`PATCH` only); PodDisruptionBudgets; HPAs (`DELETE` when no longer asked);
//! 4. one Normal `Applied` event when something was written;
//! 5. `PATCH` of the status subresource when the status changed;
//! 6. events for condition transitions (Warning when Degraded turns on or changes).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::{Instrument, field, info, info_span, warn};

use crate::builders::{self, Inputs, names};
use crate::consts::{self, annotations, condition, labels, reason};
use crate::crd::{VmWebapp, VmWebappStatus};
use crate::metrics::{ErrorLabels, KindLabels, Metrics};
use crate::status::{self, Migration, Observed, Rollout};

/// Why a reconcile pass failed (transient: the pass is retried with backoff). Spec mistakes
/// are not errors: they become a `Degraded` condition and a Warning event.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request to the API server failed.
    #[error("kubernetes API request failed: {0}")]
    Kube(#[from] kube::Error),
    /// An object could not be serialised.
    #[error("cannot serialise object: {0}")]
    Serialize(#[from] serde_json::Error),
    /// The object has no namespace (cannot happen for a namespaced kind from the API).
    #[error("the VmWebapp has no namespace")]
    MissingNamespace,
}

impl Error {
    /// Fixed label of `vm_operator_reconcile_errors_total`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Kube(kube::Error::Api(_)) => "api_status",
            Self::Kube(_) => "api_transport",
            Self::Serialize(_) => "serialize",
            Self::MissingNamespace => "invalid_object",
        }
    }
}

/// State shared by every reconcile pass.
pub struct Context {
    /// API client.
    pub client: Client,
    /// Event recorder (deduplicates repeated events into series).
    pub recorder: Recorder,
    /// Metric families.
    pub metrics: Metrics,
    /// Consecutive failures per object, for exponential backoff; reset on success.
    pub failures: Mutex<HashMap<String, u32>>,
    /// Clock for condition transition times (fixed in tests).
    pub now: fn() -> Timestamp,
    /// Reconciles running at once.
    pub concurrency: u16,
}

impl Context {
    /// A context with the real clock.
    pub fn new(client: Client, metrics: Metrics) -> Self {
        let reporter = Reporter {
            controller: consts::CONTROLLER_NAME.into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            failures: Mutex::new(HashMap::new()),
            now: Timestamp::now,
            concurrency: 4,
        }
    }

    /// Set how many reconciles run at once.
    pub fn with_concurrency(mut self, concurrency: u16) -> Self {
        self.concurrency = concurrency.max(1);
        self
    }

    fn reset_failures(&self, key: &str) {
        if let Ok(mut f) = self.failures.lock() {
            f.remove(key);
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
        let _timer = ctx.metrics.start();
        let result = Pass::new(&app, &ctx)?.run().await;
        if result.is_ok() {
            ctx.reset_failures(&key(&app));
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

/// One reconcile pass over one resource.
struct Pass<'a> {
    app: &'a VmWebapp,
    ctx: &'a Context,
    ns: String,
    name: String,
    written: Vec<String>,
}

impl<'a> Pass<'a> {
    fn new(app: &'a VmWebapp, ctx: &'a Context) -> Result<Self, Error> {
        let ns = app.namespace().ok_or(Error::MissingNamespace)?;
        Ok(Self {
            app,
            ctx,
            ns,
            name: app.name_any(),
            written: Vec::new(),
        })
    }

    fn api<K: Resource<Scope = k8s_openapi::NamespaceResourceScope>>(&self) -> Api<K>
    where
        K::DynamicType: Default,
    {
        Api::namespaced(self.ctx.client.clone(), &self.ns)
    }

    async fn run(mut self) -> Result<Action, Error> {
        let app = self.app;
        if app.metadata.deletion_timestamp.is_some() {
            // Children carry owner references; garbage collection removes them.
            return Ok(Action::await_change());
        }
        let spec = &app.spec;

        // 1. Referenced Secrets (data feeds the config hash; only names reach status).
        let (secret_data, missing) = self.read_secrets().await?;

        // 2. The Deployments as they are.
        let deployments: Api<Deployment> = self.api();
        let live_api = deployments.get_opt(&names::api(&self.name)).await?;
        let live_worker = deployments.get_opt(&names::worker(&self.name)).await?;
        // A hand-deleted API Deployment must not look like a fresh install (which would
        // re-run migrations before restoring it): the worker remembers the image too.
        let serving = Rollout::of(live_api.as_ref())
            .image
            .or_else(|| Rollout::of(live_worker.as_ref()).image);

        let mut observed = Observed {
            generation: app.metadata.generation,
            spec_image: spec.image.clone(),
            suspended: spec.suspend,
            missing_secrets: missing,
            invalid_spec: None,
            migration: Migration::NotNeeded,
            api: Rollout::of(live_api.as_ref()),
            worker: Rollout::of(live_worker.as_ref()),
            deployments_changed: false,
        };
        if spec.suspend {
            return self
                .finish(&observed, Action::requeue(Duration::from_secs(600)))
                .await;
        }
        if !observed.missing_secrets.is_empty() {
            // Not retried hot: the Secret watch triggers a pass as soon as it appears.
            return self
                .finish(&observed, Action::requeue(Duration::from_secs(300)))
                .await;
        }

        // 3. Shared children first: the migration Job needs the ServiceAccount and ConfigMap.
        let inputs = Inputs {
            serving_image: spec.image.clone(),
            secret_data: secret_data.clone(),
        };
        let desired = match builders::build(app, &inputs) {
            Ok(d) => d,
            Err(e) => {
                observed.invalid_spec = Some(e.to_string());
                return self
                    .finish(&observed, Action::requeue(Duration::from_secs(600)))
                    .await;
            }
        };
        self.ensure_fetched(&desired.service_account).await?;
        self.ensure_fetched(&desired.config_map).await?;
        self.ensure_fetched(&desired.service).await?;

        // Migration gating: the Deployments move to spec.image only after its Job succeeded.
        let needs_migration =
            spec.migrations.enabled && serving.as_deref() != Some(spec.image.as_str());
        if let (true, Some(job)) = (needs_migration, &desired.migration_job) {
            observed.migration = self.migrate(job).await?;
        }
        let target = match observed.migration {
            Migration::NotNeeded | Migration::Succeeded => Some(spec.image.clone()),
            Migration::Running | Migration::Failed { .. } => serving.clone(),
        };

        if let Some(image) = target {
            let desired = if image == spec.image {
                desired
            } else {
                match builders::build(
                    app,
                    &Inputs {
                        serving_image: image,
                        secret_data,
                    },
                ) {
                    Ok(d) => d,
                    Err(e) => {
                        observed.invalid_spec = Some(e.to_string());
                        return self
                            .finish(&observed, Action::requeue(Duration::from_secs(600)))
                            .await;
                    }
                }
            };
            self.hand_over_replicas(&deployments, &desired.api_deployment, live_api.as_ref())
                .await?;
            self.hand_over_replicas(
                &deployments,
                &desired.worker_deployment,
                live_worker.as_ref(),
            )
            .await?;
            let api_applied = self
                .ensure(&deployments, &desired.api_deployment, live_api.as_ref())
                .await?;
            let worker_applied = self
                .ensure(
                    &deployments,
                    &desired.worker_deployment,
                    live_worker.as_ref(),
                )
                .await?;
            // Only a write that moved a Deployment's generation starts a rollout; a write
            // that the API server found to change nothing must not hold Ready back.
            observed.deployments_changed = rolled(live_api.as_ref(), api_applied.as_ref())
                || rolled(live_worker.as_ref(), worker_applied.as_ref());
            self.ensure_fetched(&desired.api_pdb).await?;
            self.ensure_fetched(&desired.worker_pdb).await?;
            self.ensure_optional(&names::api(&self.name), desired.api_hpa.as_ref())
                .await?;
            self.ensure_optional(&names::worker(&self.name), desired.worker_hpa.as_ref())
                .await?;
        }

        let action = match (&observed.migration, observed.deployments_changed) {
            (Migration::Running, _) => Action::requeue(Duration::from_secs(10)),
            (_, true) => Action::requeue(Duration::from_secs(30)),
            _ if !observed.api.complete || !observed.worker.complete => {
                Action::requeue(Duration::from_secs(30))
            }
            (Migration::Failed { .. }, _) => Action::requeue(Duration::from_secs(600)),
            _ => Action::requeue(Duration::from_secs(300)),
        };
        self.finish(&observed, action).await
    }

    /// Fetch every referenced Secret once; return the referenced keys' data and the
    /// `secret/key` names that are missing.
    async fn read_secrets(
        &self,
    ) -> Result<(BTreeMap<(String, String), Option<Vec<u8>>>, Vec<String>), Error> {
        let secrets: Api<Secret> = self.api();
        let mut names: Vec<&str> = self
            .app
            .spec
            .secret_refs()
            .iter()
            .map(|r| r.name.as_str())
            .collect();
        names.sort_unstable();
        names.dedup();
        let mut fetched = BTreeMap::new();
        for name in names {
            fetched.insert(name.to_owned(), secrets.get_opt(name).await?);
        }
        let mut data = BTreeMap::new();
        let mut missing = Vec::new();
        for r in self.app.spec.secret_refs() {
            let value = fetched
                .get(&r.name)
                .and_then(Option::as_ref)
                .and_then(|s| s.data.as_ref())
                .and_then(|d| d.get(&r.key))
                .map(|b| b.0.clone());
            if value.is_none() {
                let entry = format!("{}/{}", r.name, r.key);
                if !missing.contains(&entry) {
                    missing.push(entry);
                }
            }
            data.insert((r.name.clone(), r.key.clone()), value);
        }
        Ok((data, missing))
    }

    /// Where the migration Job for `spec.image` stands; creates it when absent and replaces a
    /// failed one once the resource's generation has moved on ("the next change retries").
    async fn migrate(&mut self, desired: &Job) -> Result<Migration, Error> {
        let jobs: Api<Job> = self.api();
        let name = desired.metadata.name.clone().unwrap_or_default();
        let Some(live) = jobs.get_opt(&name).await? else {
            self.apply(&jobs, desired).await?;
            info!(job = %name, image = %self.app.spec.image, "migration job created");
            return Ok(Migration::Running);
        };
        let status = live.status.clone().unwrap_or_default();
        let has = |t: &str| {
            status
                .conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == t && c.status == "True")
        };
        if has("Complete") || status.succeeded.unwrap_or(0) > 0 {
            // Jobs are created without a TTL so that failed ones stay; a succeeded one is
            // only kept for a while (the field is mutable, the template is not).
            if live
                .spec
                .as_ref()
                .and_then(|s| s.ttl_seconds_after_finished)
                .is_none()
            {
                let ttl = serde_json::json!({
                    "spec": {"ttlSecondsAfterFinished": builders::SUCCEEDED_JOB_TTL_SECONDS}
                });
                jobs.patch(&name, &PatchParams::default(), &Patch::Merge(&ttl))
                    .await?;
                self.count_write("Job");
                self.written
                    .push(format!("Job/{name} (expiry after success)"));
            }
            return Ok(Migration::Succeeded);
        }
        if has("Failed") {
            let created_for = live
                .annotations()
                .get(annotations::MIGRATION_GENERATION)
                .cloned();
            let current = self.app.metadata.generation.unwrap_or_default().to_string();
            if created_for.as_deref() != Some(current.as_str()) {
                jobs.delete(&name, &DeleteParams::background()).await?;
                self.count_write("Job");
                self.written
                    .push(format!("deleted failed Job/{name} to retry"));
                return Ok(Migration::Running);
            }
            return Ok(Migration::Failed { job: name });
        }
        Ok(Migration::Running)
    }

    /// Apply `desired` when the live object (fetched here) differs.
    async fn ensure_fetched<K>(&mut self, desired: &K) -> Result<(), Error>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + Serialize
            + DeserializeOwned
            + Debug,
    {
        let api: Api<K> = self.api();
        let live = api.get_opt(&desired.name_any()).await?;
        self.ensure(&api, desired, live.as_ref()).await?;
        Ok(())
    }

    /// Apply `desired` unless `live` already carries the same applied-hash and every desired
    /// field (compared as the API server stores them, see [`is_subset`]); returns the object
    /// the server answered with when it wrote.
    async fn ensure<K>(
        &mut self,
        api: &Api<K>,
        desired: &K,
        live: Option<&K>,
    ) -> Result<Option<K>, Error>
    where
        K: Resource<DynamicType = ()> + Clone + Serialize + DeserializeOwned + Debug,
    {
        if let Some(live) = live
            && builders::applied_hash(live) == builders::applied_hash(desired)
            && is_subset(
                &serde_json::to_value(desired)?,
                &serde_json::to_value(live)?,
            )
        {
            return Ok(None);
        }
        self.apply(api, desired).await.map(Some)
    }

    async fn apply<K>(&mut self, api: &Api<K>, desired: &K) -> Result<K, Error>
    where
        K: Resource<DynamicType = ()> + Clone + Serialize + DeserializeOwned + Debug,
    {
        let name = desired.name_any();
        let params = PatchParams::apply(consts::FIELD_MANAGER).force();
        let returned = api.patch(&name, &params, &Patch::Apply(desired)).await?;
        let kind = K::kind(&());
        self.count_write(static_kind(&kind));
        self.written.push(format!("{kind}/{name}"));
        Ok(returned)
    }

    /// When autoscaling has just been turned on (`desired` has no `replicas`, but the operator
    /// still owns the live field), first apply the live `replicas` under a separate field
    /// manager: the operator's next apply then drops only its own claim and the value stays
    /// until the HPA changes it, instead of falling back to the default of 1.
    async fn hand_over_replicas(
        &mut self,
        api: &Api<Deployment>,
        desired: &Deployment,
        live: Option<&Deployment>,
    ) -> Result<(), Error> {
        let Some(live) = live else { return Ok(()) };
        let replicas = live.spec.as_ref().and_then(|s| s.replicas);
        let wants = desired.spec.as_ref().and_then(|s| s.replicas);
        let (None, Some(replicas)) = (wants, replicas) else {
            return Ok(());
        };
        if !manages_replicas(live, consts::FIELD_MANAGER) {
            return Ok(());
        }
        let name = desired.name_any();
        let body = serde_json::json!({
            "apiVersion": Deployment::api_version(&()),
            "kind": Deployment::kind(&()),
            "metadata": {"name": name},
            "spec": {"replicas": replicas},
        });
        let params = PatchParams::apply(consts::REPLICAS_HANDOVER_MANAGER).force();
        api.patch(&name, &params, &Patch::Apply(&body)).await?;
        self.count_write("Deployment");
        self.written
            .push(format!("Deployment/{name} (replicas handed to the HPA)"));
        Ok(())
    }

    /// HPAs exist only while asked for: apply when desired, delete ours when not.
    async fn ensure_optional(
        &mut self,
        name: &str,
        desired: Option<&HorizontalPodAutoscaler>,
    ) -> Result<(), Error> {
        let api: Api<HorizontalPodAutoscaler> = self.api();
        let live = api.get_opt(name).await?;
        match (desired, live) {
            (Some(d), live) => {
                self.ensure(&api, d, live.as_ref()).await?;
            }
            (None, Some(live)) if self.owns(&live) => {
                api.delete(name, &DeleteParams::background()).await?;
                self.count_write("HorizontalPodAutoscaler");
                self.written
                    .push(format!("deleted HorizontalPodAutoscaler/{name}"));
            }
            (None, _) => {}
        }
        Ok(())
    }

    fn owns<K: Resource>(&self, obj: &K) -> bool {
        let uid = self.app.metadata.uid.as_deref();
        obj.owner_references()
            .iter()
            .any(|o| Some(o.uid.as_str()) == uid && o.controller == Some(true))
    }

    fn count_write(&self, kind: &'static str) {
        self.ctx
            .metrics
            .writes
            .get_or_create(&KindLabels { kind })
            .inc();
    }

    /// Publish the `Applied` event, write the status if it changed, publish transition events.
    async fn finish(self, observed: &Observed, action: Action) -> Result<Action, Error> {
        let app = self.app;
        if !self.written.is_empty() {
            let mut note = format!("applied {}", self.written.join(", "));
            truncate(&mut note, 1000); // events.k8s.io notes are limited to 1 kB
            self.publish(EventType::Normal, "Applied", "Reconcile", note)
                .await;
        }
        let previous = app.status.as_ref();
        let new = status::compute(previous, observed, (self.ctx.now)());
        if previous != Some(&new) {
            let apps: Api<VmWebapp> = self.api();
            let body = serde_json::json!({
                "apiVersion": VmWebapp::api_version(&()),
                "kind": VmWebapp::kind(&()),
                "status": new,
            });
            let params = PatchParams::apply(consts::FIELD_MANAGER).force();
            apps.patch_status(&self.name, &params, &Patch::Apply(&body))
                .await?;
            self.transition_events(previous, &new).await;
        }
        Ok(action)
    }

    async fn transition_events(&self, previous: Option<&VmWebappStatus>, new: &VmWebappStatus) {
        let before = status::find(previous, condition::DEGRADED);
        if let Some(d) = status::find(Some(new), condition::DEGRADED)
            && d.status == "True"
            && before.is_none_or(|b| {
                b.status != "True" || b.reason != d.reason || b.message != d.message
            })
        {
            self.publish(
                EventType::Warning,
                &d.reason,
                "Reconcile",
                d.message.clone(),
            )
            .await;
        }
        let progressing = status::find(Some(new), condition::PROGRESSING);
        let was = status::find(previous, condition::PROGRESSING);
        if let Some(p) = progressing
            && p.reason == reason::MIGRATION_RUNNING
            && was.is_none_or(|w| w.reason != p.reason)
        {
            self.publish(
                EventType::Normal,
                "MigrationStarted",
                "Migrate",
                p.message.clone(),
            )
            .await;
        }
        let ready = status::find(Some(new), condition::READY);
        let was_ready = status::find(previous, condition::READY);
        if let Some(r) = ready
            && r.status == "True"
            && was_ready.is_none_or(|w| w.status != "True")
        {
            self.publish(EventType::Normal, "Ready", "Reconcile", r.message.clone())
                .await;
        }
    }

    /// Events are best effort: a failure is logged, never fails the pass.
    async fn publish(&self, type_: EventType, reason: &str, action: &str, note: String) {
        let event = Event {
            type_,
            reason: reason.to_owned(),
            note: Some(note),
            action: action.to_owned(),
            secondary: None,
        };
        if let Err(e) = self
            .ctx
            .recorder
            .publish(&event, &self.app.object_ref(&()))
            .await
        {
            warn!(error = %e, reason, "cannot publish event");
        }
    }
}

/// Cut `s` to at most `max` bytes on a character boundary.
fn truncate(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

fn static_kind(kind: &str) -> &'static str {
    match kind {
        "ServiceAccount" => "ServiceAccount",
        "ConfigMap" => "ConfigMap",
        "Service" => "Service",
        "Job" => "Job",
        "Deployment" => "Deployment",
        "PodDisruptionBudget" => "PodDisruptionBudget",
        "HorizontalPodAutoscaler" => "HorizontalPodAutoscaler",
        _ => "other",
    }
}

/// Whether an apply that answered `returned` changed the Deployment that was `live`:
/// created it, or moved its `metadata.generation` (the API server bumps it only when the
/// spec really changed). A server answer without a generation counts as a change.
fn rolled(live: Option<&Deployment>, returned: Option<&Deployment>) -> bool {
    match (live, returned) {
        (_, None) => false,
        (None, Some(_)) => true,
        (Some(l), Some(r)) => {
            r.metadata.generation.is_none() || l.metadata.generation != r.metadata.generation
        }
    }
}

/// Whether `manager` holds `spec.replicas` of `deployment` through server-side apply,
/// according to its `managedFields`.
pub fn manages_replicas(deployment: &Deployment, manager: &str) -> bool {
    deployment
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| {
            m.manager.as_deref() == Some(manager) && m.operation.as_deref() == Some("Apply")
        })
        .filter_map(|m| m.fields_v1.as_ref())
        .any(|f| f.0.pointer("/f:spec/f:replicas").is_some())
}

/// Whether every field of `want` is present in `have` with the same value, as the API server
/// stores it (objects recursively, arrays element by element with equal length). The server
/// adds defaults and status, drops empty maps and lists, and rewrites resource quantities in
/// canonical form (`0.5` becomes `500m`, `1.5Gi` becomes `1536Mi`); none of that is drift.
pub fn is_subset(want: &serde_json::Value, have: &serde_json::Value) -> bool {
    subset_at("", want, have)
}

/// [`is_subset`] for the value found under the object key `key`.
fn subset_at(key: &str, want: &serde_json::Value, have: &serde_json::Value) -> bool {
    use serde_json::Value;
    match (want, have) {
        (Value::Object(w), Value::Object(h)) => {
            let quantities = matches!(key, "limits" | "requests");
            w.iter().all(|(k, v)| match (h.get(k), v) {
                (None | Some(Value::Null), v) => is_empty(v),
                (Some(Value::String(hv)), Value::String(wv)) if quantities || k == "sizeLimit" => {
                    same_quantity(wv, hv)
                }
                (Some(hv), v) => subset_at(k, v, hv),
            })
        }
        (Value::Array(w), Value::Array(h)) => {
            w.len() == h.len() && w.iter().zip(h).all(|(a, b)| subset_at(key, a, b))
        }
        _ => want == have,
    }
}

/// Values the API server omits when stored: `null`, `{}` and `[]`.
fn is_empty(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Null => true,
        serde_json::Value::Object(o) => o.is_empty(),
        serde_json::Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

/// Whether two Kubernetes resource quantities denote the same amount (`"0.5"` and `"500m"`,
/// `"1.5Gi"` and `"1536Mi"`). Strings that do not parse are compared as written.
pub fn same_quantity(a: &str, b: &str) -> bool {
    if a == b {
        return true;
    }
    match (parse_quantity(a), parse_quantity(b)) {
        (Some(x), Some(y)) => (x - y).abs() <= f64::EPSILON * 16.0 * x.abs().max(y.abs()),
        _ => false,
    }
}

/// The amount a quantity string denotes: a signed decimal number, then an optional binary
/// suffix (`Ki` … `Ei`), decimal suffix (`n`, `u`, `m`, `k`, `M` … `E`) or exponent (`e3`).
fn parse_quantity(s: &str) -> Option<f64> {
    let s = s.trim();
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | '+' | '-')))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(end);
    if !number.bytes().any(|b| b.is_ascii_digit()) {
        return None;
    }
    let value: f64 = number.parse().ok()?;
    let scale = match suffix {
        "" => 1.0,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        exp => {
            let digits = exp.strip_prefix(['e', 'E'])?;
            10f64.powi(digits.parse::<i32>().ok()?)
        }
    };
    Some(value * scale)
}

/// Watch `VmWebapp`s (in `namespace`, or everywhere), their children and the Secrets they
/// reference, and reconcile until `shutdown` resolves.
pub async fn run(
    client: Client,
    namespace: Option<String>,
    ctx: Arc<Context>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    fn api<K>(client: &Client, ns: Option<&str>) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        match ns {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
    let ns = namespace.as_deref();
    let children = watcher::Config::default().labels(&format!(
        "{}={}",
        labels::MANAGED_BY,
        consts::FIELD_MANAGER
    ));
    let controller = Controller::new(
        api::<VmWebapp>(&client, ns),
        watcher::Config::default().any_semantic(),
    );
    let store = controller.store();
    let cache = store.clone();
    let metrics = ctx.metrics.clone();
    controller
        .owns(api::<Deployment>(&client, ns), children.clone())
        .owns(api::<Job>(&client, ns), children.clone())
        .owns(api::<ConfigMap>(&client, ns), children.clone())
        .owns(api::<Service>(&client, ns), children.clone())
        .owns(api::<ServiceAccount>(&client, ns), children.clone())
        .owns(api::<PodDisruptionBudget>(&client, ns), children.clone())
        .owns(api::<HorizontalPodAutoscaler>(&client, ns), children)
        .watches(
            api::<Secret>(&client, ns),
            watcher::Config::default(),
            move |secret: Secret| {
                let name = secret.name_any();
                let ns = secret.namespace();
                store
                    .state()
                    .into_iter()
                    .filter(|app| app.namespace() == ns && app.spec.references_secret(&name))
                    .map(|app| ObjectRef::from_obj(&*app))
                    .collect::<Vec<_>>()
            },
        )
        .with_config(controller::Config::default().concurrency(ctx.concurrency))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| {
            let metrics = metrics.clone();
            let apps = cache.state();
            let managed = i64::try_from(apps.len()).unwrap_or(i64::MAX);
            // Conditions as the cache last saw them: a status write comes back
            // as a watch event, which runs this again with the new status.
            metrics.observe_conditions(apps.iter().map(|a| a.status.as_ref()));
            async move {
                metrics.managed.set(managed);
                match result {
                    Ok((obj, _)) => tracing::debug!(object = %obj, "reconciled"),
                    Err(controller::Error::ReconcilerFailed(_, _)) => {}
                    Err(e) => {
                        metrics
                            .errors
                            .get_or_create(&ErrorLabels {
                                reason: "controller",
                            })
                            .inc();
                        warn!(error = %e, "controller stream error");
                    }
                }
            }
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn long_event_notes_are_cut_on_a_character_boundary() {
        let mut s = "é".repeat(600);
        truncate(&mut s, 1000);
        assert_eq!(s.len(), 1000);
        let mut odd = format!("a{}", "é".repeat(600));
        truncate(&mut odd, 1000);
        assert_eq!(odd.len(), 999);
    }

    #[test]
    fn server_defaults_are_not_drift_but_changed_values_are() {
        let want = json!({"spec": {"ports": [{"port": 80}], "type": "ClusterIP"}});
        let have = json!({"spec": {"ports": [{"port": 80, "protocol": "TCP"}], "type": "ClusterIP", "clusterIP": "10.0.0.1"}});
        assert!(is_subset(&want, &have));
        let edited = json!({"spec": {"ports": [{"port": 81}], "type": "ClusterIP"}});
        assert!(!is_subset(&want, &edited));
        let extra_port =
            json!({"spec": {"ports": [{"port": 80}, {"port": 90}], "type": "ClusterIP"}});
        assert!(!is_subset(&want, &extra_port));
    }

    #[test]
    fn quantities_in_canonical_form_and_dropped_empty_maps_are_not_drift() {
        // Without this a spec with `cpu: "0.5"` re-applied its Deployments every pass and
        // never became Ready, because the server stores `500m`.
        let want = json!({"resources": {"requests": {"cpu": "0.5", "memory": "1.5Gi"}, "limits": {}},
            "volumes": [{"emptyDir": {"sizeLimit": "1G"}}], "nodeSelector": {}});
        let have = json!({"resources": {"requests": {"cpu": "500m", "memory": "1536Mi"}},
            "volumes": [{"emptyDir": {"sizeLimit": "1e9"}}]});
        assert!(is_subset(&want, &have));
        let raised = json!({"resources": {"requests": {"cpu": "600m", "memory": "1536Mi"}},
            "volumes": [{"emptyDir": {"sizeLimit": "1G"}}]});
        assert!(!is_subset(&want, &raised));
        // Only quantity fields compare by amount; other strings compare as written.
        assert!(!is_subset(
            &json!({"env": {"value": "0.5"}}),
            &json!({"env": {"value": "500m"}})
        ));
    }

    #[test]
    fn quantities_parse_every_suffix_form() {
        for (a, b) in [
            ("1", "1000m"),
            ("2k", "2000"),
            ("1Ki", "1024"),
            ("1E", "1e18"),
            ("100M", "1e8"),
            ("250u", "250000n"),
            ("+1", "1"),
        ] {
            assert!(same_quantity(a, b), "{a} = {b}");
        }
        for (a, b) in [("1Mi", "1M"), ("1", "x"), ("cpu", "gpu"), ("1m", "1M")] {
            assert!(!same_quantity(a, b), "{a} != {b}");
        }
    }

    #[test]
    fn replicas_are_ours_only_when_our_apply_entry_lists_them() {
        let with = |manager: &str, operation: &str, fields: serde_json::Value| {
            serde_json::from_value::<Deployment>(json!({"metadata": {"name": "d", "managedFields": [
                {"manager": manager, "operation": operation, "fieldsType": "FieldsV1", "fieldsV1": fields}
            ]}}))
            .expect("deployment")
        };
        let replicas = json!({"f:spec": {"f:replicas": {}, "f:template": {}}});
        assert!(manages_replicas(
            &with("vm-operator", "Apply", replicas.clone()),
            "vm-operator"
        ));
        assert!(!manages_replicas(
            &with("vm-operator-replicas-handover", "Apply", replicas.clone()),
            "vm-operator"
        ));
        assert!(!manages_replicas(
            &with("vm-operator", "Update", replicas),
            "vm-operator"
        ));
        assert!(!manages_replicas(
            &with(
                "vm-operator",
                "Apply",
                json!({"f:spec": {"f:template": {}}})
            ),
            "vm-operator"
        ));
    }

    #[test]
    fn only_a_moved_generation_counts_as_a_rollout() {
        let at = |g: Option<i64>| {
            let mut d = Deployment::default();
            d.metadata.generation = g;
            d
        };
        assert!(!rolled(Some(&at(Some(3))), None), "no write");
        assert!(rolled(None, Some(&at(Some(1)))), "created");
        assert!(
            !rolled(Some(&at(Some(3))), Some(&at(Some(3)))),
            "a no-op apply"
        );
        assert!(
            rolled(Some(&at(Some(3))), Some(&at(Some(4)))),
            "spec changed"
        );
    }
}
