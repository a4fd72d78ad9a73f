//! `make bench-operator`: how fast the operator converges N VmWebapps on a real cluster,
//! against the floor the API server sets for the same writes. Runs only when
//! `VM_E2E_KUBECONFIG` names a kubeconfig (a disposable cluster); otherwise it prints why it
//! is skipped and passes. Build it in release mode (the make target does).
//!
//! Settings: `VM_BENCH_APPS` (default 1000) copies of `examples/minimal.yaml`;
//! `VM_BENCH_CONCURRENCY` (default: the operator's `--concurrency` default) reconciles at
//! once; `VM_BENCH_QUIET_SECS` (default 60) of steady state during which writes are counted.
//!
//! It prints:
//! - **floor**: the time 8 parallel client tasks take to server-side apply the same children
//!   (ServiceAccount, ConfigMap, Service, 2 Deployments, 2 PDBs per app) in a namespace of
//!   their own;
//! - **converge**: from the controller's start until every VmWebapp has a status for its
//!   generation and every child exists (the VmWebapps are created beforehand);
//! - the ratio of the two, the reconcile passes, the GETs the passes made, and the child
//!   and status writes during the quiet period (child writes must be 0);
//! - the process's resident memory (operator and bench client together: an upper bound).

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::{ApiResource, GroupVersionKind};
use kube::{Api, Client, Config, CustomResourceExt};
use serde_json::{Value, json};
use vm_operator::builders::{self, Inputs};
use vm_operator::controller::Context;
use vm_operator::crd::VmWebapp;

const MANAGER: &str = "vm-operator-bench";
const CLIENTS: usize = 8;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

async fn create_namespace(client: &Client, name: &str) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": name}})).expect("namespace"),
        )
        .await
        .expect("create namespace");
}

/// Server-side apply `objects` with `CLIENTS` requests in flight.
async fn apply_all(client: &Client, ns: &str, objects: Vec<Value>) {
    let params = PatchParams::apply(MANAGER).force();
    futures::stream::iter(objects)
        .map(|obj| {
            let client = client.clone();
            let params = params.clone();
            async move {
                let (group, version) =
                    match obj["apiVersion"].as_str().unwrap_or("v1").split_once('/') {
                        Some((g, v)) => (g.to_owned(), v.to_owned()),
                        None => (
                            String::new(),
                            obj["apiVersion"].as_str().unwrap_or("v1").to_owned(),
                        ),
                    };
                let kind = obj["kind"].as_str().unwrap_or_default().to_owned();
                let plural = match kind.as_str() {
                    "PodDisruptionBudget" => "poddisruptionbudgets".to_owned(),
                    "VmWebapp" => "vmwebapps".to_owned(),
                    k => format!("{}s", k.to_lowercase()),
                };
                let ar = ApiResource::from_gvk_with_plural(
                    &GroupVersionKind::gvk(&group, &version, &kind),
                    &plural,
                );
                let api: Api<DynamicObject> = Api::namespaced_with(client, ns, &ar);
                let name = obj["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                api.patch(&name, &params, &Patch::Apply(&obj))
                    .await
                    .expect("apply");
            }
        })
        .buffer_unordered(CLIENTS)
        .collect::<Vec<()>>()
        .await;
}

fn app(i: usize) -> Value {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/minimal.yaml"
    ))
    .expect("example");
    let mut v: Value = serde_yaml::from_str(&text).expect("yaml");
    v["metadata"]["name"] = json!(format!("b{i:05}"));
    v
}

fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread")]
async fn operator_converges_many_vmwebapps_close_to_the_api_server_floor() {
    let Some(path) = std::env::var_os("VM_E2E_KUBECONFIG") else {
        say(
            "bench-operator skipped: VM_E2E_KUBECONFIG is not set (point it at a kubeconfig of a disposable cluster to measure)",
        );
        return;
    };
    let n: usize = env_or("VM_BENCH_APPS", 1000);
    let quiet = Duration::from_secs(env_or("VM_BENCH_QUIET_SECS", 60));
    let kubeconfig = Kubeconfig::read_from(&path).expect("readable kubeconfig");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("usable kubeconfig");
    let client = Client::try_from(config).expect("client");

    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.patch(
        "vmwebapps.webapp.vm.dev",
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(VmWebapp::crd()),
    )
    .await
    .expect("apply CRD");
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The floor: the same children, written by a parallel client.
    let floor_ns = format!("vm-bench-floor-{}", std::process::id());
    create_namespace(&client, &floor_ns).await;
    let mut children = Vec::new();
    for i in 0..n {
        let mut a: VmWebapp = serde_json::from_value(app(i)).expect("app");
        a.metadata.namespace = Some(floor_ns.clone());
        let d = builders::build(&a, &Inputs::offline(&a)).expect("builds");
        children.extend(d.objects().expect("objects"));
    }
    let writes = children.len();
    let started = Instant::now();
    apply_all(&client, &floor_ns, children).await;
    let floor = started.elapsed();
    say(&format!(
        "floor: {writes} child writes by {CLIENTS} clients in {:.1} s",
        floor.as_secs_f64()
    ));

    // The operator: N VmWebapps exist, then the controller starts.
    let ns = format!("vm-bench-op-{}", std::process::id());
    create_namespace(&client, &ns).await;
    let apps: Vec<Value> = (0..n).map(app).collect();
    apply_all(&client, &ns, apps).await;
    let mut ctx = Context::new(client.clone(), vm_operator::metrics::Metrics::default());
    if let Ok(c) = std::env::var("VM_BENCH_CONCURRENCY")
        && let Ok(c) = c.parse()
    {
        ctx = ctx.with_concurrency(c);
    }
    let concurrency = ctx.concurrency;
    let ctx = Arc::new(ctx);
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let started = Instant::now();
    let controller = tokio::spawn(vm_operator::controller::run(
        client.clone(),
        Some(ns.clone()),
        ctx.clone(),
        async move {
            let _ = stop_rx.wait_for(|s| *s).await;
        },
    ));
    let vmws: Api<VmWebapp> = Api::namespaced(client.clone(), &ns);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let converged = loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let listed: Vec<VmWebapp> = vmws
            .list(&ListParams::default())
            .await
            .map(|l| l.items)
            .unwrap_or_default();
        let current = listed
            .iter()
            .filter(|a| {
                a.status.as_ref().is_some_and(|s| {
                    s.observed_generation == a.metadata.generation && !s.conditions.is_empty()
                })
            })
            .count();
        let deployed = deployments
            .list_metadata(&ListParams::default())
            .await
            .map(|l| l.items.len())
            .unwrap_or(0);
        if current == n && deployed == 2 * n {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(1800),
            "not converged after 30 minutes: {current}/{n} statuses, {deployed}/{} Deployments",
            2 * n
        );
    };
    let reconciles = ctx.metrics.reconciles.get();
    let reads: u64 = ctx
        .metrics
        .reads
        .get_or_create(&vm_operator::metrics::KindLabels { kind: "Secret" })
        .get();
    say(&format!(
        "converge: {n} VmWebapps in {:.1} s with concurrency {concurrency} ({reconciles} reconciles, {reads} GETs): {:.1}x the floor",
        converged.as_secs_f64(),
        converged.as_secs_f64() / floor.as_secs_f64().max(0.001)
    ));

    // Steady state: no child writes at all (status writes follow pods becoming ready).
    let kinds = [
        "ServiceAccount",
        "ConfigMap",
        "Service",
        "Job",
        "Deployment",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
    ];
    let child_writes = || -> u64 {
        kinds
            .iter()
            .map(|kind| {
                ctx.metrics
                    .writes
                    .get_or_create(&vm_operator::metrics::KindLabels { kind })
                    .get()
            })
            .sum()
    };
    let (writes_before, status_before) = (child_writes(), ctx.metrics.status_writes.get());
    tokio::time::sleep(quiet).await;
    let quiet_child = child_writes() - writes_before;
    let quiet_status = ctx.metrics.status_writes.get() - status_before;
    say(&format!(
        "steady state: {quiet_child} child writes and {quiet_status} status writes in {} s",
        quiet.as_secs()
    ));
    say(&format!(
        "memory: {} MiB resident (operator and bench client)",
        rss_kib().unwrap_or(0) / 1024
    ));

    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(30), controller).await;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    for name in [&floor_ns, &ns] {
        let _ = namespaces.delete(name, &DeleteParams::default()).await;
    }
    assert_eq!(quiet_child, 0, "a steady state makes no child writes");
}
