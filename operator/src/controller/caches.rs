//! Reflector caches of everything a pass reads: the children of every `VmWebapp` (by kind,
//! filtered on the operator's `managed-by` label) and the metadata of Secrets and
//! ConfigMaps. A pass reads from here, never with a GET, except for the data of a referenced
//! Secret or plans ConfigMap whose `resourceVersion` moved since it was last read (those
//! watches carry metadata only, so the values of unrelated Secrets never stream into the
//! operator, and unrelated ConfigMaps cost no memory beyond their names).
//!
//! Cached objects are slimmed before they are stored: `managedFields` go (for Deployments
//! only the fact "this manager holds `spec.replicas`" is kept, which the replica handover
//! needs) and so does the `last-applied-configuration` annotation.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::sync::{Arc, Mutex};

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry};
use kube::Resource;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, ObjectRef, Store, store::Writer};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// A child kind the operator applies and caches.
pub trait Child:
    Resource<DynamicType = (), Scope = NamespaceResourceScope>
    + Clone
    + Serialize
    + DeserializeOwned
    + Debug
    + Send
    + Sync
    + 'static
{
    /// The kind, as a fixed metric label.
    const KIND: &'static str;
    /// The cache of this kind.
    fn store(caches: &Caches) -> &Store<Self>;
}

macro_rules! child {
    ($t:ty, $kind:literal, $field:ident) => {
        impl Child for $t {
            const KIND: &'static str = $kind;
            fn store(caches: &Caches) -> &Store<Self> {
                &caches.$field
            }
        }
    };
}

child!(Deployment, "Deployment", deployments);
child!(Job, "Job", jobs);
child!(ConfigMap, "ConfigMap", config_maps);
child!(Service, "Service", services);
child!(ServiceAccount, "ServiceAccount", service_accounts);
child!(PodDisruptionBudget, "PodDisruptionBudget", pdbs);
child!(HorizontalPodAutoscaler, "HorizontalPodAutoscaler", hpas);
child!(CronJob, "CronJob", cron_jobs);

/// Read side of every cache.
pub struct Caches {
    deployments: Store<Deployment>,
    jobs: Store<Job>,
    config_maps: Store<ConfigMap>,
    services: Store<Service>,
    service_accounts: Store<ServiceAccount>,
    pdbs: Store<PodDisruptionBudget>,
    hpas: Store<HorizontalPodAutoscaler>,
    cron_jobs: Store<CronJob>,
    /// Secret metadata (no data).
    pub(super) secrets: Store<PartialObjectMeta<Secret>>,
    /// ConfigMap metadata (no data), of every ConfigMap, for references such as `spec.plans`.
    pub(super) config_map_meta: Store<PartialObjectMeta<ConfigMap>>,
    /// Data of referenced Secrets and ConfigMaps, keyed by (kind, namespace, name), with the
    /// `resourceVersion` it was read at.
    referenced_data: Mutex<HashMap<(Referenced, String, String), CachedData>>,
}

/// The kind of an object a `VmWebapp` references by name and whose data a pass reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Referenced {
    /// A Secret (database URL, API keys, …).
    Secret,
    /// A ConfigMap (`spec.plans`).
    ConfigMap,
}

impl Referenced {
    /// The kind, as a fixed metric label.
    pub fn kind(self) -> &'static str {
        match self {
            Self::Secret => "Secret",
            Self::ConfigMap => "ConfigMap",
        }
    }
}

struct CachedData {
    resource_version: Option<String>,
    data: Arc<BTreeMap<String, Vec<u8>>>,
}

/// Write side of every cache, fed by the watches of `controller::run` (or by tests).
pub struct Writers {
    /// Deployments.
    pub deployments: Writer<Deployment>,
    /// Jobs.
    pub jobs: Writer<Job>,
    /// ConfigMaps.
    pub config_maps: Writer<ConfigMap>,
    /// Services.
    pub services: Writer<Service>,
    /// ServiceAccounts.
    pub service_accounts: Writer<ServiceAccount>,
    /// PodDisruptionBudgets.
    pub pdbs: Writer<PodDisruptionBudget>,
    /// HorizontalPodAutoscalers.
    pub hpas: Writer<HorizontalPodAutoscaler>,
    /// CronJobs (scheduled backups).
    pub cron_jobs: Writer<CronJob>,
    /// Secret metadata.
    pub secrets: Writer<PartialObjectMeta<Secret>>,
    /// ConfigMap metadata.
    pub config_map_meta: Writer<PartialObjectMeta<ConfigMap>>,
}

impl Caches {
    /// Empty caches (not ready until their writers saw a full list) and their writers.
    pub fn new() -> (Self, Writers) {
        let (deployments, deployments_w) = reflector::store();
        let (jobs, jobs_w) = reflector::store();
        let (config_maps, config_maps_w) = reflector::store();
        let (services, services_w) = reflector::store();
        let (service_accounts, service_accounts_w) = reflector::store();
        let (pdbs, pdbs_w) = reflector::store();
        let (hpas, hpas_w) = reflector::store();
        let (cron_jobs, cron_jobs_w) = reflector::store();
        let (secrets, secrets_w) = reflector::store();
        let (config_map_meta, config_map_meta_w) = reflector::store();
        (
            Self {
                deployments,
                jobs,
                config_maps,
                services,
                service_accounts,
                pdbs,
                hpas,
                cron_jobs,
                secrets,
                config_map_meta,
                referenced_data: Mutex::default(),
            },
            Writers {
                deployments: deployments_w,
                jobs: jobs_w,
                config_maps: config_maps_w,
                services: services_w,
                service_accounts: service_accounts_w,
                pdbs: pdbs_w,
                hpas: hpas_w,
                cron_jobs: cron_jobs_w,
                secrets: secrets_w,
                config_map_meta: config_map_meta_w,
            },
        )
    }

    /// Wait until every cache has seen its first full list, so that a pass never mistakes
    /// a cache still filling for missing children (which would rewrite all of them after
    /// every restart). Fails when a watch has gone away for good.
    pub async fn ready(&self) -> Result<(), reflector::store::WriterDropped> {
        self.deployments.wait_until_ready().await?;
        self.jobs.wait_until_ready().await?;
        self.config_maps.wait_until_ready().await?;
        self.services.wait_until_ready().await?;
        self.service_accounts.wait_until_ready().await?;
        self.pdbs.wait_until_ready().await?;
        self.hpas.wait_until_ready().await?;
        self.cron_jobs.wait_until_ready().await?;
        self.secrets.wait_until_ready().await?;
        self.config_map_meta.wait_until_ready().await
    }

    /// The cached child `name` in `ns`.
    pub fn get<K: Child>(&self, ns: &str, name: &str) -> Option<Arc<K>> {
        K::store(self).get(&ObjectRef::new(name).within(ns))
    }

    /// The `resourceVersion` of the referenced object `name` in `ns`, as its metadata cache
    /// has it; `None` when the object does not exist.
    pub fn referenced_version(
        &self,
        kind: Referenced,
        ns: &str,
        name: &str,
    ) -> Option<Option<String>> {
        match kind {
            Referenced::Secret => self
                .secrets
                .get(&ObjectRef::new(name).within(ns))
                .map(|m| m.metadata.resource_version.clone()),
            Referenced::ConfigMap => self
                .config_map_meta
                .get(&ObjectRef::new(name).within(ns))
                .map(|m| m.metadata.resource_version.clone()),
        }
    }

    /// Data of a referenced object read earlier at `resource_version`.
    pub fn referenced_data(
        &self,
        kind: Referenced,
        ns: &str,
        name: &str,
        resource_version: Option<&str>,
    ) -> Option<Arc<BTreeMap<String, Vec<u8>>>> {
        let map = self.referenced_data.lock().ok()?;
        map.get(&(kind, ns.to_owned(), name.to_owned()))
            .filter(|c| c.resource_version.as_deref() == resource_version)
            .map(|c| c.data.clone())
    }

    /// Remember the data of a referenced object read at `resource_version`.
    pub fn remember_referenced(
        &self,
        kind: Referenced,
        ns: &str,
        name: &str,
        resource_version: Option<String>,
        data: BTreeMap<String, Vec<u8>>,
    ) -> Arc<BTreeMap<String, Vec<u8>>> {
        let data = Arc::new(data);
        if let Ok(mut map) = self.referenced_data.lock() {
            map.insert(
                (kind, ns.to_owned(), name.to_owned()),
                CachedData {
                    resource_version,
                    data: data.clone(),
                },
            );
        }
        data
    }

    /// Drop the data of a referenced object that no longer exists.
    pub fn forget_referenced(&self, kind: Referenced, ns: &str, name: &str) {
        if let Ok(mut map) = self.referenced_data.lock() {
            map.remove(&(kind, ns.to_owned(), name.to_owned()));
        }
    }

    /// Referenced objects of `kind` whose data is cached (for tests and memory accounting).
    pub fn cached_count(&self, kind: Referenced) -> usize {
        self.referenced_data
            .lock()
            .map(|m| m.keys().filter(|(k, _, _)| *k == kind).count())
            .unwrap_or(0)
    }
}

/// What a cache keeps of a watched object: everything the pass compares, without
/// `managedFields` (the bulk of a stored object) and the `last-applied-configuration`
/// annotation. A Deployment keeps one marker entry per manager that applied
/// `spec.replicas`, which is all [`super::replicas::manages_replicas`] looks at.
pub fn slim<K: Resource>(obj: &mut K)
where
    K::DynamicType: Default,
{
    let meta = obj.meta_mut();
    if let Some(a) = meta.annotations.as_mut() {
        a.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
    let kept: Vec<ManagedFieldsEntry> = meta
        .managed_fields
        .take()
        .into_iter()
        .flatten()
        .filter(|m| {
            K::kind(&Default::default()) == "Deployment"
                && m.fields_v1
                    .as_ref()
                    .is_some_and(|f| f.0.pointer("/f:spec/f:replicas").is_some())
        })
        .map(|m| ManagedFieldsEntry {
            manager: m.manager,
            operation: m.operation,
            fields_type: m.fields_type,
            fields_v1: Some(FieldsV1(serde_json::json!({"f:spec": {"f:replicas": {}}}))),
            ..ManagedFieldsEntry::default()
        })
        .collect();
    meta.managed_fields = (!kept.is_empty()).then_some(kept);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn slimmed_objects_keep_only_who_applied_deployment_replicas() {
        // The cache must stay small with a thousand VmWebapps, yet the replica handover
        // still needs to know whether the operator's apply holds spec.replicas.
        let entries = json!([
            {"manager": "vm-operator", "operation": "Apply", "fieldsType": "FieldsV1",
             "fieldsV1": {"f:spec": {"f:replicas": {}, "f:template": {"f:spec": {}}}}},
            {"manager": "kube-controller-manager", "operation": "Update", "fieldsType": "FieldsV1",
             "fieldsV1": {"f:status": {}}}
        ]);
        let mut d: Deployment = serde_json::from_value(json!({"metadata": {"name": "d",
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}", "keep": "1"},
            "managedFields": entries}}))
        .expect("deployment");
        slim(&mut d);
        assert!(super::super::replicas::manages_replicas(&d, "vm-operator"));
        let kept = d.metadata.managed_fields.as_ref().expect("kept");
        assert_eq!(kept.len(), 1);
        assert_eq!(
            d.metadata.annotations.as_ref().map(|a| a.len()),
            Some(1),
            "only the last-applied annotation goes"
        );
        let mut cm: ConfigMap =
            serde_json::from_value(json!({"metadata": {"name": "c", "managedFields": entries}}))
                .expect("configmap");
        slim(&mut cm);
        assert_eq!(cm.metadata.managed_fields, None);
    }
}
