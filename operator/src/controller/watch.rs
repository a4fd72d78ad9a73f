//! Watch wiring: the `VmWebapp` watch drives the controller; one watch per child kind (only
//! objects labelled as managed by the operator) fills its cache and triggers a pass of the
//! owner; metadata-only Secret and ConfigMap watches fill their caches and trigger a pass of
//! every `VmWebapp` in the namespace that references the object.

use std::sync::Arc;

use futures::{Stream, StreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{self, Controller};
use kube::runtime::reflector::store::Writer;
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, predicates, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use tracing::warn;

use super::caches::{Child, slim};
use super::{Context, error_policy, reconcile};
use crate::consts::{self, labels};
use crate::crd::VmWebapp;
use crate::metrics::ErrorLabels;

/// Triggers for one VmWebapp that arrive within this window become one pass. A first pass
/// writes up to seven children, whose watch events arrive one by one: without the window the
/// next pass could start with half of them in the caches and write the rest again. Children
/// change seldom, so the delay never hides updates for long.
const DEBOUNCE: std::time::Duration = std::time::Duration::from_millis(500);

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

/// The watch of one child kind: slimmed, reflected into its cache, as owner triggers.
fn child_stream<K: Child>(
    client: &Client,
    ns: Option<&str>,
    config: watcher::Config,
    writer: Writer<K>,
) -> impl Stream<Item = Result<K, watcher::Error>> + Send + 'static {
    watcher(api::<K>(client, ns), config)
        .default_backoff()
        .modify(slim)
        .reflect(writer)
        .touched_objects()
}

/// Watch `VmWebapp`s (in `namespace`, or everywhere), their children and the Secrets they
/// reference, and reconcile until `shutdown` resolves. Call once per [`Context`]: it takes
/// the context's cache writers.
pub async fn run(
    client: Client,
    namespace: Option<String>,
    ctx: Arc<Context>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let Some(writers) = ctx.take_writers() else {
        warn!("the controller's caches are already fed by another run; not starting");
        return;
    };
    let ns = namespace.as_deref();
    let children = watcher::Config::default().labels(&format!(
        "{}={}",
        labels::MANAGED_BY,
        consts::FIELD_MANAGER
    ));
    // Only a new generation (a spec change) of a VmWebapp triggers a pass: the operator's
    // own status writes must not, or each would cost one more pass per resource. Changes
    // of children, Secrets and requeues trigger passes on their own.
    let (store, app_writer) = reflector::store();
    let apps = watcher(
        api::<VmWebapp>(&client, ns),
        watcher::Config::default().any_semantic(),
    )
    .default_backoff()
    .modify(slim)
    .reflect(app_writer)
    .applied_objects()
    .predicate_filter(predicates::generation, Default::default());
    let controller = Controller::for_stream(apps, store.clone());
    let cache = store.clone();
    let metrics = ctx.metrics.clone();
    // The condition gauge, recounted from the cache every few seconds rather than after
    // every pass (which would cost O(resources) per pass at a thousand VmWebapps).
    let gauge_cache = store.clone();
    let gauge_metrics = metrics.clone();
    let gauge = tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            tick.tick().await;
            let apps = gauge_cache.state();
            gauge_metrics
                .managed
                .set(i64::try_from(apps.len()).unwrap_or(i64::MAX));
            gauge_metrics.observe_conditions(apps.iter().map(|a| a.status.as_ref()));
            gauge_metrics.observe_backups(
                apps.iter().map(|a| a.status.as_ref()),
                k8s_openapi::jiff::Timestamp::now(),
            );
        }
    });
    // Metadata only: the names and resourceVersions of Secrets, never their data.
    let secrets = watcher(
        api::<PartialObjectMeta<Secret>>(&client, ns),
        watcher::Config::default(),
    )
    .default_backoff()
    .modify(slim)
    .reflect(writers.secrets)
    .touched_objects();
    // Metadata only as well: every ConfigMap's name and resourceVersion, for `spec.plans`.
    let config_maps = watcher(
        api::<PartialObjectMeta<ConfigMap>>(&client, ns),
        watcher::Config::default(),
    )
    .default_backoff()
    .modify(slim)
    .reflect(writers.config_map_meta)
    .touched_objects();
    let referencing = store.clone();
    let failures_ctx = ctx.clone();
    controller
        .owns_stream(child_stream::<Deployment>(
            &client,
            ns,
            children.clone(),
            writers.deployments,
        ))
        .owns_stream(child_stream::<Job>(
            &client,
            ns,
            children.clone(),
            writers.jobs,
        ))
        .owns_stream(child_stream::<ConfigMap>(
            &client,
            ns,
            children.clone(),
            writers.config_maps,
        ))
        .owns_stream(child_stream::<Service>(
            &client,
            ns,
            children.clone(),
            writers.services,
        ))
        .owns_stream(child_stream::<ServiceAccount>(
            &client,
            ns,
            children.clone(),
            writers.service_accounts,
        ))
        .owns_stream(child_stream::<PodDisruptionBudget>(
            &client,
            ns,
            children.clone(),
            writers.pdbs,
        ))
        .owns_stream(child_stream::<HorizontalPodAutoscaler>(
            &client,
            ns,
            children.clone(),
            writers.hpas,
        ))
        // A CronJob's status moves when a backup starts and succeeds: the pass copies
        // `lastSuccessfulTime` into the VmWebapp's status.
        .owns_stream(child_stream::<CronJob>(
            &client,
            ns,
            children,
            writers.cron_jobs,
        ))
        .watches_stream(secrets, move |secret| {
            let name = secret.name_any();
            let ns = secret.namespace();
            store
                .state()
                .into_iter()
                .filter(|app| app.namespace() == ns && app.spec.references_secret(&name))
                .map(|app| ObjectRef::from_obj(&*app))
                .collect::<Vec<_>>()
        })
        .watches_stream(config_maps, move |cm| {
            let name = cm.name_any();
            let ns = cm.namespace();
            referencing
                .state()
                .into_iter()
                .filter(|app| app.namespace() == ns && app.spec.references_config_map(&name))
                .map(|app| ObjectRef::from_obj(&*app))
                .collect::<Vec<_>>()
        })
        .with_config(
            controller::Config::default()
                .concurrency(ctx.concurrency)
                .debounce(DEBOUNCE),
        )
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| {
            let metrics = metrics.clone();
            // Failure counts of resources that are gone would otherwise stay forever.
            failures_ctx.prune_failures(|key| {
                let (ns, name) = key.split_once('/').unwrap_or(("", key));
                cache.get(&ObjectRef::new(name).within(ns)).is_some()
            });
            async move {
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
    gauge.abort();
}
