//! Pure builders: a `VmWebapp` plus a few facts the controller looked up (the image the
//! Deployments should run, the hash of the referenced Secret data) in, every desired child
//! object out. No I/O happens here, so `vm-operator render` and the reconcile share this code
//! and most behaviour is covered by plain unit tests.
//!
//! Children (all owned by the `VmWebapp`, all carrying the `app.kubernetes.io/*` labels):
//! ServiceAccount, ConfigMap (non-secret env), API Service, migration Job, API and worker
//! Deployments, PodDisruptionBudgets, HorizontalPodAutoscalers when autoscaling is set, and
//! the backup CronJob when `spec.backup` is set.

mod backup;
mod pod;

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, HorizontalPodAutoscaler, HorizontalPodAutoscalerSpec, MetricSpec,
    MetricTarget, ResourceMetricSource,
};
use k8s_openapi::api::batch::v1::{CronJob, Job, JobSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount, ServicePort, ServiceSpec};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::consts::{self, annotations, component, labels};
use crate::crd::{AutoscalingSpec, VmWebapp};

pub use pod::Workload;

/// Why desired objects could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The resource has no namespace (it is namespaced, so the input is malformed).
    #[error("the VmWebapp has no namespace")]
    MissingNamespace,
    /// The resource has no name.
    #[error("the VmWebapp has no name")]
    MissingName,
    /// A container would request more than its limit: the API server would refuse the
    /// Deployment. (The CRD cannot refuse it up front on every supported Kubernetes version:
    /// CEL's `quantity()` library needs 1.29 or later, and the operator supports 1.26.)
    #[error(
        "{field}: requests.{resource} ({request}) exceeds limits.{resource} ({limit}); lower the request or raise the limit"
    )]
    RequestAboveLimit {
        /// `spec.api.resources` or `spec.worker.resources`.
        field: &'static str,
        /// `cpu`, `memory`, …
        resource: String,
        /// The request as written.
        request: String,
        /// The limit as written.
        limit: String,
    },
    /// `spec.backup.schedule` cannot be read or never fires.
    #[error(transparent)]
    BackupSchedule(#[from] crate::schedule::ScheduleError),
}

/// Every request of `r` is at most its limit (when both are set and parse).
fn check_requests(
    field: &'static str,
    r: &k8s_openapi::api::core::v1::ResourceRequirements,
) -> Result<(), BuildError> {
    let (Some(requests), Some(limits)) = (&r.requests, &r.limits) else {
        return Ok(());
    };
    for (resource, request) in requests {
        let Some(limit) = limits.get(resource) else {
            continue;
        };
        if let (Some(rq), Some(lim)) = (
            crate::quantity::parse_quantity(&request.0),
            crate::quantity::parse_quantity(&limit.0),
        ) && rq > lim
            && !crate::quantity::same_quantity(&request.0, &limit.0)
        {
            return Err(BuildError::RequestAboveLimit {
                field,
                resource: resource.clone(),
                request: request.0.clone(),
                limit: limit.0.clone(),
            });
        }
    }
    Ok(())
}

/// Facts about the world the builders need but cannot compute themselves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inputs {
    /// Image the Deployments run. Equals `spec.image` except while a migration to
    /// `spec.image` has not succeeded yet, when it is the image still serving.
    pub serving_image: String,
    /// Data of every referenced Secret key, keyed by (Secret name, key); `None` when the
    /// Secret or key is unknown (missing in the cluster, or not given to `render`).
    pub secret_data: BTreeMap<(String, String), Option<Vec<u8>>>,
    /// The plans YAML under `spec.plans`' ConfigMap key; `None` when `spec.plans` is unset
    /// or the key is unknown (not given to `render`).
    pub plans: Option<String>,
    /// The API Deployment does not exist yet: with autoscaling it is created at
    /// `minReplicas` (afterwards the HPA owns `replicas`), so a first install never starts,
    /// and never reports Ready, below what the spec asks for.
    pub creating_api: bool,
    /// The same for the worker Deployment.
    pub creating_worker: bool,
}

impl Inputs {
    /// Inputs for a first install whose Deployments run `spec.image` and whose Secrets are
    /// unknown: what `render` uses when it is given no Secret manifests.
    pub fn offline(app: &VmWebapp) -> Self {
        let secret_data = app
            .spec
            .secret_refs()
            .into_iter()
            .map(|r| ((r.name.clone(), r.key.clone()), None))
            .collect();
        Self {
            serving_image: app.spec.image.clone(),
            secret_data,
            plans: None,
            creating_api: true,
            creating_worker: true,
        }
    }
}

/// Every object a reconcile wants to exist, in the order they are applied.
#[derive(Clone, Debug, PartialEq)]
pub struct Desired {
    /// Identity the pods run as.
    pub service_account: ServiceAccount,
    /// Non-secret environment.
    pub config_map: ConfigMap,
    /// The API Service.
    pub service: Service,
    /// The migration Job for `spec.image`, when migrations are enabled.
    pub migration_job: Option<Job>,
    /// The API Deployment.
    pub api_deployment: Deployment,
    /// The worker Deployment.
    pub worker_deployment: Deployment,
    /// Disruption budget of the API.
    pub api_pdb: PodDisruptionBudget,
    /// Disruption budget of the worker.
    pub worker_pdb: PodDisruptionBudget,
    /// HPA of the API when `spec.api.autoscaling` is set.
    pub api_hpa: Option<HorizontalPodAutoscaler>,
    /// HPA of the worker when `spec.worker.autoscaling` is set.
    pub worker_hpa: Option<HorizontalPodAutoscaler>,
    /// The backup CronJob when `spec.backup` is set.
    pub backup_cron_job: Option<CronJob>,
    /// The pod-template hash of ConfigMap and Secret data.
    pub config_hash: String,
}

/// Names of the children of a `VmWebapp` called `name`.
pub mod names {
    /// ServiceAccount and API Service.
    pub fn base(name: &str) -> String {
        name.to_owned()
    }
    /// The ConfigMap.
    pub fn config_map(name: &str) -> String {
        format!("{name}-config")
    }
    /// API Deployment, PDB and HPA.
    pub fn api(name: &str) -> String {
        format!("{name}-api")
    }
    /// Worker Deployment, PDB and HPA.
    pub fn worker(name: &str) -> String {
        format!("{name}-worker")
    }
    /// The backup CronJob (at most 47 characters: CronJob names may have 52).
    pub fn backup(name: &str) -> String {
        format!("{name}-backup")
    }
    /// Migration Job for an image (a new image is a new Job, since Job templates are immutable).
    pub fn migration_job(name: &str, image: &str) -> String {
        let digest = super::sha256_hex(image.as_bytes());
        format!("{name}-migrate-{}", &digest[..10])
    }
}

/// Everything the builders derive from the resource's identity.
#[derive(Clone, Debug)]
pub(crate) struct Ident {
    pub name: String,
    pub namespace: String,
    pub owner: Option<OwnerReference>,
}

impl Ident {
    fn of(app: &VmWebapp) -> Result<Self, BuildError> {
        let name = app.metadata.name.clone().ok_or(BuildError::MissingName)?;
        let namespace = app
            .metadata
            .namespace
            .clone()
            .ok_or(BuildError::MissingNamespace)?;
        // Without a uid (render of a file) there is no owner reference to point at.
        let owner = app.controller_owner_ref(&());
        Ok(Self {
            name,
            namespace,
            owner,
        })
    }

    /// Labels of a child of the given component.
    pub fn labels(&self, component: &str) -> BTreeMap<String, String> {
        let mut l = self.selector(component);
        l.insert(labels::MANAGED_BY.into(), consts::FIELD_MANAGER.into());
        l.insert(labels::PART_OF.into(), consts::PART_OF.into());
        l
    }

    /// The immutable subset of [`Self::labels`] used in selectors.
    pub fn selector(&self, component: &str) -> BTreeMap<String, String> {
        BTreeMap::from([
            (labels::NAME.to_owned(), consts::APP_NAME.to_owned()),
            (labels::INSTANCE.to_owned(), self.name.clone()),
            (labels::COMPONENT.to_owned(), component.to_owned()),
        ])
    }

    pub fn meta(&self, name: String, component: &str) -> ObjectMeta {
        ObjectMeta {
            name: Some(name),
            namespace: Some(self.namespace.clone()),
            labels: Some(self.labels(component)),
            owner_references: self.owner.clone().map(|o| vec![o]),
            ..ObjectMeta::default()
        }
    }
}

/// Build every desired child of `app`.
pub fn build(app: &VmWebapp, inputs: &Inputs) -> Result<Desired, BuildError> {
    let id = Ident::of(app)?;
    check_requests("spec.api.resources", &app.spec.api.resources)?;
    check_requests("spec.worker.resources", &app.spec.worker.resources)?;
    let config_map = config_map(app, &id);
    let config_hash = config_hash(&config_map, &inputs.secret_data, inputs.plans.as_deref());
    let spec = &app.spec;

    let api_deployment = deployment(
        &id,
        names::api(&id.name),
        component::API,
        replicas(
            spec.api.replicas,
            spec.api.autoscaling.as_ref(),
            inputs.creating_api,
        ),
        Some(RollingUpdateDeployment {
            max_surge: Some(IntOrString::String("25%".into())),
            max_unavailable: Some(IntOrString::Int(0)),
        }),
        pod::template(app, &id, Workload::Api, &inputs.serving_image, &config_hash),
    );
    let worker_deployment = deployment(
        &id,
        names::worker(&id.name),
        component::WORKER,
        replicas(
            spec.worker.replicas,
            spec.worker.autoscaling.as_ref(),
            inputs.creating_worker,
        ),
        None,
        pod::template(
            app,
            &id,
            Workload::Worker,
            &inputs.serving_image,
            &config_hash,
        ),
    );
    let migration_job = spec
        .migrations
        .enabled
        .then(|| migration_job(app, &id, &config_hash));

    let backup_cron_job = backup::cron_job(app, &id, &inputs.serving_image, &config_hash)?;

    let mut desired = Desired {
        service_account: ServiceAccount {
            metadata: id.meta(names::base(&id.name), component::CONFIG),
            automount_service_account_token: Some(false),
            ..ServiceAccount::default()
        },
        service: service(app, &id),
        migration_job,
        api_pdb: pdb(&id, names::api(&id.name), component::API),
        worker_pdb: pdb(&id, names::worker(&id.name), component::WORKER),
        api_hpa: spec
            .api
            .autoscaling
            .as_ref()
            .map(|a| hpa(&id, names::api(&id.name), component::API, a)),
        worker_hpa: spec
            .worker
            .autoscaling
            .as_ref()
            .map(|a| hpa(&id, names::worker(&id.name), component::WORKER, a)),
        backup_cron_job,
        api_deployment,
        worker_deployment,
        config_map,
        config_hash,
    };
    desired.stamp();
    Ok(desired)
}

/// `spec.replicas` of a Deployment: the spec's count without autoscaling; with it, the HPA's
/// minimum when the Deployment is created and nothing afterwards (the HPA owns the field).
fn replicas(replicas: i32, autoscaling: Option<&AutoscalingSpec>, creating: bool) -> Option<i32> {
    match autoscaling {
        None => Some(replicas),
        Some(a) if creating => Some(a.min_replicas),
        Some(_) => None,
    }
}

/// The non-secret environment every container loads with `envFrom`.
pub fn env_data(app: &VmWebapp) -> BTreeMap<String, String> {
    let spec = &app.spec;
    let mut data = BTreeMap::from([
        ("APP_ENV".to_owned(), spec.app_env.as_str().to_owned()),
        (
            "VM_ENABLE_MANAGED_MODE".to_owned(),
            spec.managed_mode.to_string(),
        ),
        (
            "VM_WORKSPACE_ROOT".to_owned(),
            consts::app::WORKSPACE_ROOT.to_owned(),
        ),
        ("LOG_LEVEL".to_owned(), spec.log_level.clone()),
        ("LOG_FORMAT".to_owned(), spec.log_format.as_str().to_owned()),
        ("PORT".to_owned(), spec.api.port.to_string()),
    ]);
    if let Some(model) = &spec.llm.model {
        data.insert("KIMI_MODEL".into(), model.clone());
    }
    if let Some(url) = &spec.llm.base_url {
        data.insert("KIMI_BASE_URL".into(), url.clone());
    }
    for e in &spec.env {
        if let Some(v) = &e.value {
            data.insert(e.name.clone(), v.clone());
        }
    }
    data
}

fn config_map(app: &VmWebapp, id: &Ident) -> ConfigMap {
    ConfigMap {
        metadata: id.meta(names::config_map(&id.name), component::CONFIG),
        data: Some(env_data(app)),
        ..ConfigMap::default()
    }
}

/// SHA-256 over the ConfigMap data, the data of every referenced Secret key and the plans
/// YAML, in a stable order. Unknown Secret keys hash as a distinct marker, so creating a
/// missing Secret rolls pods; so does any change to the plans.
pub fn config_hash(
    cm: &ConfigMap,
    secrets: &BTreeMap<(String, String), Option<Vec<u8>>>,
    plans: Option<&str>,
) -> String {
    let mut h = Sha256::new();
    for (k, v) in cm.data.iter().flatten() {
        h.update(b"cm\0");
        h.update(k.as_bytes());
        h.update(b"\0");
        h.update(v.as_bytes());
        h.update(b"\0");
    }
    for ((name, key), value) in secrets {
        h.update(b"secret\0");
        h.update(name.as_bytes());
        h.update(b"\0");
        h.update(key.as_bytes());
        h.update(b"\0");
        match value {
            Some(v) => {
                h.update(b"1");
                h.update((v.len() as u64).to_be_bytes());
                h.update(v);
            }
            None => h.update(b"0"),
        }
    }
    // Absent plans add nothing, so that adding the field leaves existing hashes unchanged.
    if let Some(plans) = plans {
        h.update(b"plans\0");
        h.update((plans.len() as u64).to_be_bytes());
        h.update(plans.as_bytes());
    }
    hex::encode(h.finalize())
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn deployment(
    id: &Ident,
    name: String,
    component: &str,
    replicas: Option<i32>,
    rolling: Option<RollingUpdateDeployment>,
    template: k8s_openapi::api::core::v1::PodTemplateSpec,
) -> Deployment {
    Deployment {
        metadata: id.meta(name, component),
        spec: Some(DeploymentSpec {
            replicas,
            revision_history_limit: Some(5),
            selector: LabelSelector {
                match_labels: Some(id.selector(component)),
                ..LabelSelector::default()
            },
            strategy: rolling.map(|r| DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(r),
            }),
            template,
            ..DeploymentSpec::default()
        }),
        status: None,
    }
}

fn service(app: &VmWebapp, id: &Ident) -> Service {
    Service {
        metadata: id.meta(names::base(&id.name), component::API),
        spec: Some(ServiceSpec {
            type_: Some(app.spec.api.service.type_.as_str().to_owned()),
            selector: Some(id.selector(component::API)),
            ports: Some(vec![ServicePort {
                name: Some(consts::app::HTTP_PORT_NAME.into()),
                port: app.spec.api.service.port,
                target_port: Some(IntOrString::String(consts::app::HTTP_PORT_NAME.into())),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

fn pdb(id: &Ident, name: String, component: &str) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: id.meta(name, component),
        spec: Some(PodDisruptionBudgetSpec {
            // maxUnavailable (not minAvailable) so a single replica never blocks a node drain.
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(id.selector(component)),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        status: None,
    }
}

fn hpa(id: &Ident, name: String, component: &str, a: &AutoscalingSpec) -> HorizontalPodAutoscaler {
    HorizontalPodAutoscaler {
        metadata: id.meta(name.clone(), component),
        spec: Some(HorizontalPodAutoscalerSpec {
            scale_target_ref: CrossVersionObjectReference {
                api_version: Some("apps/v1".into()),
                kind: "Deployment".into(),
                name,
            },
            min_replicas: Some(a.min_replicas),
            max_replicas: a.max_replicas,
            metrics: Some(vec![MetricSpec {
                type_: "Resource".into(),
                resource: Some(ResourceMetricSource {
                    name: "cpu".into(),
                    target: MetricTarget {
                        type_: "Utilization".into(),
                        average_utilization: Some(a.target_cpu_utilization_percentage),
                        ..MetricTarget::default()
                    },
                }),
                ..MetricSpec::default()
            }]),
            behavior: None,
        }),
        status: None,
    }
}

/// How long a succeeded migration Job is kept (for post-mortems) once the controller has seen
/// it succeed; failed Jobs have no TTL and stay until the next spec change retries them.
pub const SUCCEEDED_JOB_TTL_SECONDS: i32 = 86_400;

fn migration_job(app: &VmWebapp, id: &Ident, config_hash: &str) -> Job {
    let image = &app.spec.image;
    let mut meta = id.meta(names::migration_job(&id.name, image), component::MIGRATION);
    meta.annotations = Some(BTreeMap::from([
        (annotations::MIGRATION_IMAGE.to_owned(), image.clone()),
        (
            annotations::MIGRATION_GENERATION.to_owned(),
            app.metadata.generation.unwrap_or_default().to_string(),
        ),
    ]));
    Job {
        metadata: meta,
        spec: Some(JobSpec {
            backoff_limit: Some(app.spec.migrations.backoff_limit),
            active_deadline_seconds: Some(app.spec.migrations.active_deadline_seconds),
            // No TTL here: a failed Job must stay (logs for the post-mortem, and its presence
            // is what stops the controller from retrying the same image and generation). The
            // controller sets [`SUCCEEDED_JOB_TTL_SECONDS`] once the Job has succeeded.
            ttl_seconds_after_finished: None,
            template: pod::template(app, id, Workload::Migration, image, config_hash),
            ..JobSpec::default()
        }),
        status: None,
    }
}

impl Desired {
    /// Put the applied-hash annotation on every object.
    fn stamp(&mut self) {
        stamp(&mut self.service_account);
        stamp(&mut self.config_map);
        stamp(&mut self.service);
        if let Some(job) = &mut self.migration_job {
            stamp(job);
        }
        stamp(&mut self.api_deployment);
        stamp(&mut self.worker_deployment);
        stamp(&mut self.api_pdb);
        stamp(&mut self.worker_pdb);
        for hpa in self.api_hpa.iter_mut().chain(self.worker_hpa.iter_mut()) {
            stamp(hpa);
        }
        if let Some(cron) = &mut self.backup_cron_job {
            stamp(cron);
        }
    }

    /// All objects in apply order, as JSON values with `apiVersion` and `kind`.
    pub fn objects(&self) -> Result<Vec<serde_json::Value>, serde_json::Error> {
        let mut out = vec![
            to_value(&self.service_account)?,
            to_value(&self.config_map)?,
            to_value(&self.service)?,
        ];
        if let Some(job) = &self.migration_job {
            out.push(to_value(job)?);
        }
        out.push(to_value(&self.api_deployment)?);
        out.push(to_value(&self.worker_deployment)?);
        out.push(to_value(&self.api_pdb)?);
        out.push(to_value(&self.worker_pdb)?);
        for hpa in self.api_hpa.iter().chain(self.worker_hpa.iter()) {
            out.push(to_value(hpa)?);
        }
        if let Some(cron) = &self.backup_cron_job {
            out.push(to_value(cron)?);
        }
        Ok(out)
    }
}

/// Set [`annotations::APPLIED_HASH`] on `obj` to the SHA-256 of its JSON form without it.
pub fn stamp<K: Resource + Serialize>(obj: &mut K) {
    if let Some(a) = obj.meta_mut().annotations.as_mut() {
        a.remove(annotations::APPLIED_HASH);
    }
    // Serialising k8s-openapi types cannot fail (string keys, no non-finite floats).
    let bytes = serde_json::to_vec(obj).unwrap_or_default();
    let hash = sha256_hex(&bytes);
    obj.meta_mut()
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(annotations::APPLIED_HASH.to_owned(), hash);
}

/// The applied-hash annotation of an object, if any.
pub fn applied_hash<K: Resource>(obj: &K) -> Option<&str> {
    obj.meta()
        .annotations
        .as_ref()
        .and_then(|a| a.get(annotations::APPLIED_HASH))
        .map(String::as_str)
}

fn to_value<K: Serialize>(k: &K) -> Result<serde_json::Value, serde_json::Error> {
    // k8s-openapi types serialize their own apiVersion and kind.
    serde_json::to_value(k)
}

#[cfg(test)]
mod tests;
