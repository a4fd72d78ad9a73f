//! End-to-end suite against a real cluster. Runs only when `VM_E2E_KUBECONFIG` names a
//! kubeconfig; otherwise it prints why it is skipped and passes.
//!
//! It needs cluster-admin-like rights for the CRD and a namespace, and a working garbage
//! collector (any real cluster; not a bare API server). It runs the controller in-process
//! against that cluster, so no operator image is needed; pods may stay unready when the
//! app image (`VM_E2E_IMAGE`, default the examples' image) cannot be pulled, which this
//! suite does not depend on.
//!
//! Scenarios:
//! - lifecycle: apply the CRD; create a namespace and a Secret; apply a VmWebapp; wait for
//!   its children and its status; delete a child and see it restored; rotate the Secret and
//!   see the pod template's config hash change; delete the VmWebapp and see its children
//!   garbage-collected; delete the namespace;
//! - quota: a ResourceQuota forbids Deployments; the VmWebapp reports `Degraded=True,
//!   reason=ApplyFailed` naming the Deployment with the API server's "exceeded quota", and
//!   a Warning event; once the quota is removed the condition clears;
//! - invalid name: a VmWebapp called `my.app` (not a DNS-1035 label, so no Service could
//!   carry its name) is refused by `kubectl apply` itself, through the CRD's CEL rule;
//! - plans: a VmWebapp whose `spec.plans` ConfigMap does not exist yet reports
//!   `Degraded=True, reason=ConfigMapMissing` and gets no Deployment; once the ConfigMap is
//!   created the API Deployment mounts it and names it by `VM_PLANS_FILE`; editing it
//!   changes the pod template's config hash.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config, CustomResourceExt, ResourceExt};
use serde_json::json;
use vm_operator::controller::Context;
use vm_operator::crd::VmWebapp;

const MANAGER: &str = "vm-operator-e2e";
const TIMEOUT: Duration = Duration::from_secs(120);

async fn eventually<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn config_hash(d: &Deployment) -> Option<String> {
    d.spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.annotations.as_ref())
        .and_then(|a| a.get("webapp.vm.dev/config-hash").cloned())
}

/// A client for the cluster named by `VM_E2E_KUBECONFIG`, or `None` (with the reason on
/// stderr) when it is not set.
async fn cluster(scenario: &str) -> Option<Client> {
    let Some(path) = std::env::var_os("VM_E2E_KUBECONFIG") else {
        // Written to the stderr handle directly so that it shows even when output is captured.
        let _ = writeln!(
            std::io::stderr(),
            "e2e {scenario} skipped: VM_E2E_KUBECONFIG is not set (point it at a kubeconfig of a disposable cluster to run it)"
        );
        return None;
    };
    let kubeconfig =
        Kubeconfig::read_from(&path).expect("VM_E2E_KUBECONFIG is a readable kubeconfig");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig is usable");
    Some(Client::try_from(config).expect("client"))
}

/// Apply the CRD and wait until it is established.
async fn install_crd(client: &Client) {
    let apply = PatchParams::apply(MANAGER).force();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.patch(
        "vmwebapps.webapp.vm.dev",
        &apply,
        &Patch::Apply(VmWebapp::crd()),
    )
    .await
    .expect("apply CRD");
    eventually("the CRD to be established", || async {
        let crd = crds.get("vmwebapps.webapp.vm.dev").await.ok()?;
        let established = crd
            .status?
            .conditions?
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        established.then_some(())
    })
    .await;
}

/// The controller, run in-process and watching one namespace only.
struct Controller {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Controller {
    fn start(client: &Client, ns: &str) -> Self {
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let ctx = Arc::new(Context::new(
            client.clone(),
            vm_operator::metrics::Metrics::default(),
        ));
        let task = tokio::spawn(vm_operator::controller::run(
            client.clone(),
            Some(ns.to_owned()),
            ctx,
            async move {
                let _ = stopped.wait_for(|s| *s).await;
            },
        ));
        Self { stop, task }
    }

    /// Stop it and wait (at most 10 s) for its watches to end.
    async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }
}

/// Create a fresh namespace called `vm-e2e-<scenario>-<pid>`.
async fn namespace(client: &Client, scenario: &str) -> String {
    let ns_name = format!("vm-e2e-{scenario}-{}", std::process::id());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns_name}})).expect("namespace"),
        )
        .await
        .expect("create namespace");
    ns_name
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_reconciles_restores_rolls_and_cleans_up_on_a_real_cluster() {
    let Some(client) = cluster("lifecycle").await else {
        return;
    };
    let apply = PatchParams::apply(MANAGER).force();
    install_crd(&client).await;

    // Namespace and Secret.
    let ns_name = namespace(&client, "life").await;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns_name);
    let secret = |url: &str| json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "e2e-db"}, "stringData": {"url": url}});
    secrets
        .patch(
            "e2e-db",
            &apply,
            &Patch::Apply(secret("postgres://e2e:one@db/e2e")),
        )
        .await
        .expect("create secret");

    // The controller, in-process, watching only this namespace.
    let controller = Controller::start(&client, &ns_name);

    // The resource.
    let image =
        std::env::var("VM_E2E_IMAGE").unwrap_or_else(|_| "ghcr.io/vmwebapp/vm-webapp:0.1.0".into());
    let apps: Api<VmWebapp> = Api::namespaced(client.clone(), &ns_name);
    let app = json!({
        "apiVersion": "webapp.vm.dev/v1alpha1",
        "kind": "VmWebapp",
        "metadata": {"name": "e2e"},
        "spec": {
            "image": image,
            "appEnv": "staging",
            "database": {"name": "e2e-db", "key": "url"},
            "api": {"replicas": 1},
            "worker": {"replicas": 0},
            "migrations": {"enabled": false},
            // A stream write timeout above the request timeout: the API's grace period
            // must cover it (5 s delay + 120 s + 5 s).
            "env": [{"name": "VM_STREAM_WRITE_TIMEOUT_MS", "value": "120000"}],
        }
    });
    apps.patch("e2e", &apply, &Patch::Apply(&app))
        .await
        .expect("apply VmWebapp");

    // Children and status.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns_name);
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns_name);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns_name);
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns_name);
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), &ns_name);
    let api_deployment = eventually("the API Deployment", || async {
        deployments.get_opt("e2e-api").await.ok().flatten()
    })
    .await;
    assert_eq!(
        api_deployment
            .owner_references()
            .first()
            .map(|o| o.kind.as_str()),
        Some("VmWebapp")
    );
    assert_eq!(
        api_deployment
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .and_then(|p| p.termination_grace_period_seconds),
        Some(130),
        "the API's grace period covers the stream write timeout set in spec.env"
    );
    eventually("the worker Deployment", || async {
        deployments.get_opt("e2e-worker").await.ok().flatten()
    })
    .await;
    eventually("the Service", || async {
        services.get_opt("e2e").await.ok().flatten()
    })
    .await;
    eventually("the ServiceAccount", || async {
        accounts.get_opt("e2e").await.ok().flatten()
    })
    .await;
    eventually("the PDB", || async {
        pdbs.get_opt("e2e-api").await.ok().flatten()
    })
    .await;
    let cm = eventually("the ConfigMap", || async {
        config_maps.get_opt("e2e-config").await.ok().flatten()
    })
    .await;
    eventually("a status for generation 1", || async {
        let status = apps.get("e2e").await.ok()?.status?;
        let has_conditions = ["Ready", "Progressing", "Degraded"]
            .iter()
            .all(|t| status.conditions.iter().any(|c| c.type_ == *t));
        (status.observed_generation == Some(1) && has_conditions).then_some(())
    })
    .await;

    // A deleted child is restored.
    config_maps
        .delete("e2e-config", &DeleteParams::default())
        .await
        .expect("delete ConfigMap");
    eventually("the ConfigMap to be restored", || async {
        let restored = config_maps.get_opt("e2e-config").await.ok().flatten()?;
        (restored.uid() != cm.uid()).then_some(())
    })
    .await;

    // A rotated Secret rolls the pod template.
    let before = eventually("a config hash", || async {
        deployments
            .get("e2e-api")
            .await
            .ok()
            .and_then(|d| config_hash(&d))
    })
    .await;
    secrets
        .patch(
            "e2e-db",
            &apply,
            &Patch::Apply(secret("postgres://e2e:two@db/e2e")),
        )
        .await
        .expect("rotate secret");
    eventually("the pod template to change after the rotation", || async {
        let after = deployments
            .get("e2e-api")
            .await
            .ok()
            .and_then(|d| config_hash(&d))?;
        (after != before).then_some(())
    })
    .await;

    // Deleting the resource garbage-collects its children.
    apps.delete("e2e", &DeleteParams::foreground())
        .await
        .expect("delete VmWebapp");
    eventually("the children to be garbage-collected", || async {
        let gone = deployments.get_opt("e2e-api").await.ok()?.is_none()
            && config_maps.get_opt("e2e-config").await.ok()?.is_none();
        gone.then_some(())
    })
    .await;

    controller.stop().await;
    namespaces
        .delete(&ns_name, &DeleteParams::default())
        .await
        .expect("delete namespace");
}

/// A minimal VmWebapp (local mode, no Secret) called `name`.
fn minimal(name: &str) -> serde_json::Value {
    let image =
        std::env::var("VM_E2E_IMAGE").unwrap_or_else(|_| "ghcr.io/vmwebapp/vm-webapp:0.1.0".into());
    json!({
        "apiVersion": "webapp.vm.dev/v1alpha1",
        "kind": "VmWebapp",
        "metadata": {"name": name},
        "spec": {
            "image": image,
            "appEnv": "local",
            "api": {"replicas": 1},
            "worker": {"replicas": 0},
            "migrations": {"enabled": false},
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quota_refusal_is_reported_in_status_and_an_event_then_cleared() {
    // Issue kind: with a quota forbidding Deployments the VmWebapp stayed without any status
    // or event; Argo CD waited forever and `kubectl wait` timed out without a reason.
    let Some(client) = cluster("quota").await else {
        return;
    };
    let apply = PatchParams::apply(MANAGER).force();
    install_crd(&client).await;
    let ns_name = namespace(&client, "quota").await;
    let quotas: Api<k8s_openapi::api::core::v1::ResourceQuota> =
        Api::namespaced(client.clone(), &ns_name);
    quotas
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "no-deploy"},
                "spec": {"hard": {"count/deployments.apps": "0"}}}))
            .expect("quota"),
        )
        .await
        .expect("create quota");
    // The quota controller must have counted usage before it enforces.
    eventually("the quota to be counted", || async {
        let q = quotas.get("no-deploy").await.ok()?;
        q.status?.used.is_some().then_some(())
    })
    .await;

    let controller = Controller::start(&client, &ns_name);
    let apps: Api<VmWebapp> = Api::namespaced(client.clone(), &ns_name);
    apps.patch("demo", &apply, &Patch::Apply(minimal("demo")))
        .await
        .expect("apply VmWebapp");

    let message = eventually("Degraded=ApplyFailed in the status", || async {
        let status = apps.get("demo").await.ok()?.status?;
        let d = status.conditions.iter().find(|c| c.type_ == "Degraded")?;
        (status.observed_generation == Some(1) && d.status == "True" && d.reason == "ApplyFailed")
            .then(|| d.message.clone())
    })
    .await;
    assert!(message.contains("Deployment/demo-api"), "{message}");
    assert!(message.contains("exceeded quota"), "{message}");
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(client.clone(), &ns_name);
    eventually("a Warning ApplyFailed event on the VmWebapp", || async {
        let list = events.list(&Default::default()).await.ok()?;
        list.items
            .iter()
            .any(|e| {
                e.type_.as_deref() == Some("Warning")
                    && e.reason.as_deref() == Some("ApplyFailed")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("demo")
            })
            .then_some(())
    })
    .await;

    // The cause goes away: the next pass (backoff) applies and clears the condition.
    quotas
        .delete("no-deploy", &DeleteParams::default())
        .await
        .expect("delete quota");
    eventually("Degraded to clear once the quota is gone", || async {
        let status = apps.get("demo").await.ok()?.status?;
        let d = status.conditions.iter().find(|c| c.type_ == "Degraded")?;
        (d.status == "False").then_some(())
    })
    .await;

    controller.stop().await;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .delete(&ns_name, &DeleteParams::default())
        .await
        .expect("delete namespace");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_that_cannot_be_a_service_name_is_refused_at_apply_time() {
    // Issue kind: `my.app` was accepted, then every pass failed on its Service.
    let Some(client) = cluster("invalid-name").await else {
        return;
    };
    install_crd(&client).await;
    let ns_name = namespace(&client, "name").await;
    let apps: Api<VmWebapp> = Api::namespaced(client.clone(), &ns_name);
    let err = apps
        .patch(
            "my.app",
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(minimal("my.app")),
        )
        .await
        .expect_err("the API server refuses the name");
    match err {
        kube::Error::Api(s) => {
            assert_eq!(s.code, 422, "{s:?}");
            assert!(s.message.contains("DNS-1035"), "{}", s.message);
        }
        other => panic!("expected a 422 Invalid, got {other}"),
    }
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .delete(&ns_name, &DeleteParams::default())
        .await
        .expect("delete namespace");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plans_config_map_is_awaited_then_mounted_and_its_edit_rolls_the_pods() {
    let Some(client) = cluster("plans").await else {
        return;
    };
    let apply = PatchParams::apply(MANAGER).force();
    install_crd(&client).await;
    let ns_name = namespace(&client, "plans").await;
    let controller = Controller::start(&client, &ns_name);
    let apps: Api<VmWebapp> = Api::namespaced(client.clone(), &ns_name);
    let mut app = minimal("billing");
    app["spec"]["plans"] = json!({"name": "plans"});
    apps.patch("billing", &apply, &Patch::Apply(&app))
        .await
        .expect("apply VmWebapp");

    // Before the ConfigMap exists: Degraded with the reason, and no Deployment.
    eventually("Degraded=ConfigMapMissing", || async {
        let status = apps.get("billing").await.ok()?.status?;
        status
            .conditions
            .iter()
            .any(|c| c.type_ == "Degraded" && c.reason == "ConfigMapMissing")
            .then_some(())
    })
    .await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns_name);
    assert!(
        deployments
            .get_opt("billing-api")
            .await
            .expect("get")
            .is_none()
    );

    // Creating it lets the reconcile go on: the key is mounted and named by VM_PLANS_FILE.
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns_name);
    let plans = |text: &str| {
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "plans"},
               "data": {"plans.yaml": text}})
    };
    config_maps
        .patch(
            "plans",
            &apply,
            &Patch::Apply(plans(
                "default_plan: free\nplans:\n  free:\n    meters: {}\n",
            )),
        )
        .await
        .expect("create plans");
    let api = eventually("the API Deployment with the plans mounted", || async {
        let d = deployments.get_opt("billing-api").await.ok().flatten()?;
        let pod = d.spec.as_ref()?.template.spec.as_ref()?;
        let mounted = pod
            .volumes
            .iter()
            .flatten()
            .any(|v| v.config_map.as_ref().is_some_and(|c| c.name == "plans"));
        let named = pod.containers[0]
            .env
            .iter()
            .flatten()
            .any(|e| e.name == "VM_PLANS_FILE");
        (mounted && named).then_some(d)
    })
    .await;
    let before = config_hash(&api).expect("config hash");

    // Editing the plans rolls the pods (the app reads the file at start-up).
    config_maps
        .patch(
            "plans",
            &apply,
            &Patch::Apply(plans("default_plan: free\nplans:\n  free:\n    meters: {runs: {allowance: 5, overage: block}}\n")),
        )
        .await
        .expect("edit plans");
    eventually("the pod template to change after the edit", || async {
        let d = deployments.get("billing-api").await.ok()?;
        (config_hash(&d)? != before).then_some(())
    })
    .await;

    controller.stop().await;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let _ = namespaces.delete(&ns_name, &DeleteParams::default()).await;
}
