//! One reconcile pass over one `VmWebapp`: read what exists from the caches, decide the
//! image the Deployments may run, apply what differs (independent children in parallel),
//! then report: the status (written only when it changed) and events.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::CronJob;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};

use super::Context;
use super::caches::{Child, Referenced};
use super::error::{Error, Refusal};
use super::replicas::rolled;
use crate::builders::{self, Desired, Inputs, names};
use crate::consts;
use crate::crd::VmWebapp;
use crate::metrics::KindLabels;
use crate::status::{self, Migration, Observed, Rollout};

/// Secret data of every referenced key, keyed by (Secret name, key).
type SecretData = BTreeMap<(String, String), Option<Vec<u8>>>;
/// A referenced object as read: its `resourceVersion` and its data by key.
type Fetched = (Option<String>, BTreeMap<String, Vec<u8>>);

/// One pass; methods live with their concern (`apply`, `migration`, `replicas`, `events`).
pub(super) struct Pass<'a> {
    pub(super) app: &'a VmWebapp,
    pub(super) ctx: &'a Context,
    pub(super) ns: String,
    pub(super) name: String,
    /// Notes of every write, for the `Applied` event.
    pub(super) written: Mutex<Vec<String>>,
    /// Writes the API server refused.
    pub(super) refused: Mutex<Vec<Refusal>>,
    /// Referenced Secret values, so that no message this pass reports can echo one.
    secret_values: Vec<Vec<u8>>,
    /// What the status reports.
    pub(super) observed: Observed,
}

impl<'a> Pass<'a> {
    pub(super) fn new(app: &'a VmWebapp, ctx: &'a Context) -> Result<Self, Error> {
        let ns = app.namespace().ok_or(Error::MissingNamespace)?;
        let name = app.name_any();
        let spec = &app.spec;
        let min = |replicas: i32, autoscaling: Option<&crate::crd::AutoscalingSpec>| {
            autoscaling.map_or(replicas, |a| a.min_replicas)
        };
        let observed = Observed {
            generation: app.metadata.generation,
            spec_image: spec.image.clone(),
            suspended: spec.suspend,
            api_min_ready: min(spec.api.replicas, spec.api.autoscaling.as_ref()),
            worker_min_ready: min(spec.worker.replicas, spec.worker.autoscaling.as_ref()),
            ..Observed::default()
        };
        Ok(Self {
            app,
            ctx,
            ns,
            name,
            written: Mutex::default(),
            refused: Mutex::default(),
            secret_values: Vec::new(),
            observed,
        })
    }

    /// Whether a write of this pass was refused.
    pub(super) fn was_refused(&self) -> bool {
        self.refused.lock().map(|r| !r.is_empty()).unwrap_or(false)
    }

    pub(super) async fn run(&mut self) -> Result<Action, Error> {
        let app = self.app;
        if app.metadata.deletion_timestamp.is_some() {
            // Children carry owner references; garbage collection removes them.
            return Ok(Action::await_change());
        }
        let spec = &app.spec;

        // 1. Referenced Secrets and plans (data feeds the config hash; only names reach
        //    status).
        let (secret_data, missing) = self.read_secrets().await?;
        self.secret_values = secret_data.values().flatten().cloned().collect();
        let plans = self.read_plans().await?;

        // 2. The Deployments as they are.
        let live_api = self.cached::<Deployment>(&names::api(&self.name));
        let live_worker = self.cached::<Deployment>(&names::worker(&self.name));
        // A hand-deleted API Deployment must not look like a fresh install (which would
        // re-run migrations before restoring it): the worker remembers the image too.
        let serving = Rollout::of(live_api.as_deref())
            .image
            .or_else(|| Rollout::of(live_worker.as_deref()).image);
        self.observed.missing_secrets = missing;
        self.observed.missing_config_map = plans.as_ref().err().cloned();
        self.observed.api = Rollout::of(live_api.as_deref());
        self.observed.worker = Rollout::of(live_worker.as_deref());
        self.observed.backup = self.backup_status();
        if spec.suspend {
            return self.finish(Action::requeue(Duration::from_secs(600))).await;
        }
        let Ok(plans) = plans else {
            // Not retried hot: the ConfigMap watch triggers a pass as soon as it appears.
            return self.finish(Action::requeue(Duration::from_secs(300))).await;
        };
        if !self.observed.missing_secrets.is_empty() {
            // Not retried hot: the Secret watch triggers a pass as soon as it appears.
            return self.finish(Action::requeue(Duration::from_secs(300))).await;
        }

        // 3. Shared children first (in parallel): the migration Job and the Deployments
        //    need the ServiceAccount and the ConfigMap.
        let inputs = Inputs {
            serving_image: spec.image.clone(),
            secret_data,
            plans,
            creating_api: live_api.is_none(),
            creating_worker: live_worker.is_none(),
        };
        let Some(desired) = self.build(&inputs) else {
            return self.finish(Action::requeue(Duration::from_secs(600))).await;
        };
        tokio::try_join!(
            self.ensure(&desired.service_account),
            self.ensure(&desired.config_map),
            self.ensure(&desired.service),
        )?;
        if self.was_refused() {
            return self.finish(Action::await_change()).await;
        }

        // Migration gating: the Deployments move to spec.image only after its Job succeeded.
        let needs_migration =
            spec.migrations.enabled && serving.as_deref() != Some(spec.image.as_str());
        if let (true, Some(job)) = (needs_migration, &desired.migration_job) {
            self.observed.migration = self.migrate(job).await?;
        }
        let target = match self.observed.migration {
            Migration::NotNeeded | Migration::Succeeded => Some(spec.image.clone()),
            Migration::Running | Migration::Failed { .. } => serving.clone(),
        };

        // 4. Deployments, disruption budgets and autoscalers, in parallel.
        if let Some(image) = target {
            let desired = if image == spec.image {
                desired
            } else {
                match self.build(&Inputs {
                    serving_image: image,
                    ..inputs
                }) {
                    Some(d) => d,
                    None => {
                        return self.finish(Action::requeue(Duration::from_secs(600))).await;
                    }
                }
            };
            let deployment = async |desired: &Deployment, live: Option<&Deployment>| {
                self.hand_over_replicas(desired, live).await?;
                self.ensure_against(desired, live).await
            };
            let (api_name, worker_name) = (names::api(&self.name), names::worker(&self.name));
            let backup_name = names::backup(&self.name);
            let (api_applied, worker_applied, (), (), (), (), ()) = tokio::try_join!(
                deployment(&desired.api_deployment, live_api.as_deref()),
                deployment(&desired.worker_deployment, live_worker.as_deref()),
                async { self.ensure(&desired.api_pdb).await.map(drop) },
                async { self.ensure(&desired.worker_pdb).await.map(drop) },
                self.ensure_optional(&api_name, desired.api_hpa.as_ref()),
                self.ensure_optional(&worker_name, desired.worker_hpa.as_ref()),
                self.ensure_optional(&backup_name, desired.backup_cron_job.as_ref()),
            )?;
            // Only a write that moved a Deployment's generation starts a rollout; a write
            // that the API server found to change nothing must not hold Ready back.
            self.observed.deployments_changed = rolled(live_api.as_deref(), api_applied.as_ref())
                || rolled(live_worker.as_deref(), worker_applied.as_ref());
            if let Some(d) = &api_applied {
                self.observed.api = Rollout::of(Some(d));
            }
            if let Some(d) = &worker_applied {
                self.observed.worker = Rollout::of(Some(d));
            }
        }

        let o = &self.observed;
        let action = match (&o.migration, o.deployments_changed) {
            (Migration::Running, _) => Action::requeue(Duration::from_secs(10)),
            (_, true) => Action::requeue(Duration::from_secs(30)),
            _ if !o.api.complete || !o.worker.complete => Action::requeue(Duration::from_secs(30)),
            (Migration::Failed { .. }, _) => Action::requeue(Duration::from_secs(600)),
            _ => Action::requeue(Duration::from_secs(300)),
        };
        self.finish(action).await
    }

    /// The builders' output for `inputs`, or `None` with the reason in the status.
    fn build(&mut self, inputs: &Inputs) -> Option<Desired> {
        match builders::build(self.app, inputs) {
            Ok(d) => Some(d),
            Err(e) => {
                self.observed.invalid_spec = Some(e.to_string());
                None
            }
        }
    }

    /// HPAs and the backup CronJob exist only while asked for: apply when desired, delete
    /// ours when not.
    async fn ensure_optional<K: Child>(
        &self,
        name: &str,
        desired: Option<&K>,
    ) -> Result<(), Error> {
        match (desired, self.cached::<K>(name)) {
            (Some(d), live) => {
                self.ensure_against(d, live.as_deref()).await?;
            }
            (None, Some(live)) if self.owns(&*live) => {
                self.delete::<K>(name, format!("deleted {}/{name}", K::KIND))
                    .await?;
            }
            (None, _) => {}
        }
        Ok(())
    }

    /// What the status says of scheduled backups: the CronJob's last successful and last
    /// scheduled times (from the cache, so a backup finishing triggers a pass that copies
    /// them) and the age after which the last success counts as stale.
    fn backup_status(&self) -> Option<crate::crd::BackupStatus> {
        let backup = self.app.spec.backup.as_ref()?;
        let name = names::backup(&self.name);
        let live = self.cached::<CronJob>(&name);
        let status = live.as_ref().and_then(|c| c.status.as_ref());
        let time = |t: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>| {
            t.map(|t| t.0.to_string())
        };
        Some(crate::crd::BackupStatus {
            configured_time: time(
                live.as_ref()
                    .and_then(|c| c.metadata.creation_timestamp.as_ref()),
            ),
            cron_job: live.is_some().then_some(name),
            last_successful_time: time(status.and_then(|s| s.last_successful_time.as_ref())),
            last_schedule_time: time(status.and_then(|s| s.last_schedule_time.as_ref())),
            max_age_seconds: crate::schedule::max_backup_age_seconds(
                &backup.schedule,
                backup.active_deadline_seconds,
            )
            .ok(),
        })
    }

    /// The data of the referenced objects of `kind` called `names`; `None` for one that
    /// does not exist. Which exist comes from the metadata cache; their data from the data
    /// cache when the `resourceVersion` has not moved, else from one GET each (in parallel).
    async fn read_referenced<'n>(
        &self,
        kind: Referenced,
        mut names: Vec<&'n str>,
    ) -> Result<BTreeMap<&'n str, Option<Arc<BTreeMap<String, Vec<u8>>>>>, Error> {
        let caches = &self.ctx.caches;
        names.sort_unstable();
        names.dedup();
        let reads = names.into_iter().map(|name| async move {
            let Some(version) = caches.referenced_version(kind, &self.ns, name) else {
                caches.forget_referenced(kind, &self.ns, name);
                return Ok::<_, Error>((name, None));
            };
            if let Some(data) = caches.referenced_data(kind, &self.ns, name, version.as_deref()) {
                return Ok((name, Some(data)));
            }
            self.ctx
                .metrics
                .reads
                .get_or_create(&KindLabels { kind: kind.kind() })
                .inc();
            let client = self.ctx.client.clone();
            let fetched: Option<Fetched> = match kind {
                Referenced::Secret => Api::<Secret>::namespaced(client, &self.ns)
                    .get_opt(name)
                    .await?
                    .map(|s| {
                        let data = s.data.unwrap_or_default();
                        let data = data.into_iter().map(|(k, v)| (k, v.0)).collect();
                        (s.metadata.resource_version, data)
                    }),
                Referenced::ConfigMap => Api::<ConfigMap>::namespaced(client, &self.ns)
                    .get_opt(name)
                    .await?
                    .map(|c| {
                        let text = c.data.unwrap_or_default().into_iter();
                        let binary = c.binary_data.unwrap_or_default().into_iter();
                        let data = text
                            .map(|(k, v)| (k, v.into_bytes()))
                            .chain(binary.map(|(k, v)| (k, v.0)))
                            .collect();
                        (c.metadata.resource_version, data)
                    }),
            };
            let Some((version, data)) = fetched else {
                caches.forget_referenced(kind, &self.ns, name);
                return Ok((name, None));
            };
            let stored = caches.remember_referenced(kind, &self.ns, name, version, data);
            Ok((name, Some(stored)))
        });
        Ok(futures::future::try_join_all(reads)
            .await?
            .into_iter()
            .collect())
    }

    /// The data of every referenced Secret key and the `secret/key` names that are missing.
    async fn read_secrets(&self) -> Result<(SecretData, Vec<String>), Error> {
        let refs = self.app.spec.secret_refs();
        let names = refs.iter().map(|r| r.name.as_str()).collect();
        let fetched = self.read_referenced(Referenced::Secret, names).await?;
        let mut data = BTreeMap::new();
        let mut missing = Vec::new();
        for r in refs {
            let value = fetched
                .get(r.name.as_str())
                .and_then(Option::as_ref)
                .and_then(|d| d.get(&r.key))
                .cloned();
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

    /// The plans YAML of `spec.plans` (`Ok(None)` when unset), or the `configmap/key` that
    /// is missing (a missing ConfigMap, a missing key, or a value that is not UTF-8).
    async fn read_plans(&self) -> Result<Result<Option<String>, String>, Error> {
        let Some(plans) = &self.app.spec.plans else {
            return Ok(Ok(None));
        };
        let fetched = self
            .read_referenced(Referenced::ConfigMap, vec![plans.name.as_str()])
            .await?;
        let value = fetched
            .get(plans.name.as_str())
            .and_then(Option::as_ref)
            .and_then(|d| d.get(&plans.key))
            .and_then(|v| String::from_utf8(v.clone()).ok());
        Ok(value
            .map(Some)
            .ok_or_else(|| format!("{}/{}", plans.name, plans.key)))
    }

    /// `text` with every referenced Secret value (of 4 bytes or more) replaced, so that an
    /// API server message that echoes a value never reaches status, events or logs.
    pub(super) fn scrub(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for value in &self.secret_values {
            if value.len() < 4 {
                continue;
            }
            if let Ok(v) = std::str::from_utf8(value)
                && out.contains(v)
            {
                out = out.replace(v, "[redacted]");
            }
        }
        out
    }

    /// Publish the `Applied` event, write the status if it changed, publish transition events.
    pub(super) async fn finish(&mut self, action: Action) -> Result<Action, Error> {
        self.applied_event().await;
        let refused = self.refused.lock().map(|r| r.clone()).unwrap_or_default();
        self.observed.refused = refused.iter().map(ToString::to_string).collect();
        let action = if refused.is_empty() {
            action
        } else {
            // Not retried hot, but retried: a raised quota or a changed policy sends no
            // event that would trigger a pass.
            Action::requeue(self.ctx.backoff(&super::key(self.app)))
        };
        self.write_status().await?;
        Ok(action)
    }

    /// Write the status computed from what this pass observed, when it differs from the
    /// current one, and publish the events of its transitions.
    pub(super) async fn write_status(&self) -> Result<(), Error> {
        let previous = self.app.status.as_ref();
        let new = status::compute(previous, &self.observed, (self.ctx.now)());
        if previous == Some(&new) {
            return Ok(());
        }
        let apps: Api<VmWebapp> = Api::namespaced(self.ctx.client.clone(), &self.ns);
        let body = serde_json::json!({
            "apiVersion": VmWebapp::api_version(&()),
            "kind": VmWebapp::kind(&()),
            "status": new,
        });
        let params = PatchParams::apply(consts::FIELD_MANAGER).force();
        apps.patch_status(&self.name, &params, &Patch::Apply(&body))
            .await?;
        self.ctx.metrics.status_writes.inc();
        self.transition_events(previous, &new).await;
        Ok(())
    }

    /// After several failed passes in a row, say so in the status (best effort: the API
    /// server may be the thing that fails).
    pub(super) async fn report_api_errors(&mut self, error: &Error) {
        self.observed.api_errors = Some(self.scrub(&error.summary()));
        if let Err(e) = self.write_status().await {
            tracing::debug!(error = %e, "cannot report the failing passes in the status");
        }
    }
}
