//! Mocked-API scenarios of the reconcile loop: each test names the live objects in the
//! caches (the "world"), then lists, in order, every request a pass must make (see the
//! module docs of `controller`) and what the fake API server answers. With warm caches a
//! pass makes no GET: every script below holds only the writes it must make.

use serde_json::{Value, json};

use crate::builders::{self, Desired, Inputs, names};
use crate::controller::Referenced;
use crate::crd::VmWebapp;
use crate::fixtures::{
    Expect, Reply, app_from_example, live, reconcile_in, reconcile_with, secret, seed, test_context,
};
use crate::status::{self, Observed, Rollout};

const MINIMAL: &str = include_str!("../../../examples/minimal.yaml");
const PRODUCTION: &str = include_str!("../../../examples/production.yaml");

struct Paths {
    ns: String,
    name: String,
}

impl Paths {
    fn of(app: &VmWebapp) -> Self {
        Self {
            ns: app.metadata.namespace.clone().unwrap_or_default(),
            name: app.metadata.name.clone().unwrap_or_default(),
        }
    }
    fn core(&self, plural: &str, name: &str) -> String {
        format!("/api/v1/namespaces/{}/{plural}/{name}", self.ns)
    }
    fn group(&self, gv: &str, plural: &str, name: &str) -> String {
        format!("/apis/{gv}/namespaces/{}/{plural}/{name}", self.ns)
    }
    fn secret(&self, name: &str) -> String {
        self.core("secrets", name)
    }
    fn deployment(&self, name: &str) -> String {
        self.group("apps/v1", "deployments", name)
    }
    fn sa(&self) -> String {
        self.core("serviceaccounts", &self.name)
    }
    fn cm(&self) -> String {
        self.core("configmaps", &names::config_map(&self.name))
    }
    fn svc(&self) -> String {
        self.core("services", &self.name)
    }
    fn job(&self, image: &str) -> String {
        self.group("batch/v1", "jobs", &names::migration_job(&self.name, image))
    }
    fn pdb(&self, name: &str) -> String {
        self.group("policy/v1", "poddisruptionbudgets", name)
    }
    fn hpa(&self, name: &str) -> String {
        self.group("autoscaling/v2", "horizontalpodautoscalers", name)
    }
    fn status(&self) -> String {
        self.group(
            "webapp.vm.dev/v1alpha1",
            "vmwebapps",
            &format!("{}/status", self.name),
        )
    }
    fn api(&self) -> String {
        names::api(&self.name)
    }
    fn worker(&self) -> String {
        names::worker(&self.name)
    }
}

fn condition<'a>(status_patch: &'a Value, type_: &str) -> &'a Value {
    status_patch["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == type_))
        .unwrap_or(&Value::Null)
}

fn container(deployment_patch: &Value) -> &Value {
    &deployment_patch["spec"]["template"]["spec"]["containers"][0]
}

/// The production example's Secrets, in the order a reconcile reads them (by name), with
/// values whose distinctive parts [`assert_no_secret_values`] looks for in request bodies.
fn prod_secrets(ns: &str) -> [(&'static str, Value); 6] {
    PROD_SECRET_DATA.map(|(name, key, value)| (name, secret(ns, name, &[(key, value)])))
}

const PROD_SECRET_DATA: [(&str, &str, &str); 6] = [
    ("vm-api-keys", "keys", "ops:api-key-secret-0123456789:admin"),
    ("vm-db", "url", "postgres://user:db-password@db/vm"),
    (
        "vm-db-owner",
        "url",
        "postgres://owner:owner-password@db/vm",
    ),
    ("vm-llm", "api-key", "sk-llm-secret"),
    ("vm-redis", "url", "redis://:redis-password@redis"),
    ("vm-webhooks", "secrets", "github:webhook-secret-0123456789"),
];

fn prod_desired(app: &VmWebapp, image: &str) -> Desired {
    let mut inputs = Inputs::offline(app);
    inputs.serving_image = image.into();
    // As a later pass builds them: the Deployments exist and the HPAs own replicas.
    inputs.creating_api = false;
    inputs.creating_worker = false;
    inputs.secret_data = PROD_SECRET_DATA
        .iter()
        .map(|(name, key, value)| {
            (
                ((*name).to_owned(), (*key).to_owned()),
                Some(value.as_bytes().to_vec()),
            )
        })
        .collect();
    builders::build(app, &inputs).expect("builds")
}

fn assert_no_secret_values(bodies: &[String]) {
    for b in bodies {
        for secret in [
            "db-password",
            "owner-password",
            "redis-password",
            "sk-llm-secret",
            "api-key-secret",
            "webhook-secret",
        ] {
            assert!(
                !b.contains(secret),
                "a request body carries a secret value: {b}"
            );
        }
    }
}

/// Every child of `d` as the API server returns it (the Job only when `with_job`).
fn world_of(d: &Desired, with_job: bool) -> Vec<Value> {
    let mut w = vec![
        live(&d.service_account),
        live(&d.config_map),
        live(&d.service),
        live(&d.api_deployment),
        live(&d.worker_deployment),
        live(&d.api_pdb),
        live(&d.worker_pdb),
    ];
    w.extend(d.api_hpa.iter().map(live));
    w.extend(d.worker_hpa.iter().map(live));
    if with_job {
        w.extend(d.migration_job.iter().map(live));
    }
    w
}

/// The minimal example's children as a previous pass left them, with `replicas` in place.
fn minimal_desired(app: &VmWebapp) -> Desired {
    builders::build(app, &Inputs::offline(app)).expect("builds")
}

/// The status a previous pass wrote for the children of `d` running and available.
fn settled_status(app: &VmWebapp, d: &Desired) -> crate::crd::VmWebappStatus {
    let up = |dep: &k8s_openapi::api::apps::v1::Deployment| {
        Rollout::of(Some(
            &serde_json::from_value(live(dep)).expect("deployment"),
        ))
    };
    let observed = Observed {
        generation: app.metadata.generation,
        spec_image: app.spec.image.clone(),
        api: up(&d.api_deployment),
        worker: up(&d.worker_deployment),
        api_min_ready: app.spec.api.replicas,
        worker_min_ready: app.spec.worker.replicas,
        ..Observed::default()
    };
    let earlier = k8s_openapi::jiff::Timestamp::from_second(1_600_000_000).expect("timestamp");
    status::compute(None, &observed, earlier)
}

/// The production example's Secrets as metadata in the cache and data already read.
fn prod_context(
    app: &VmWebapp,
    world: &[Value],
) -> (std::sync::Arc<super::Context>, crate::fixtures::Handle) {
    let (ctx, handle) = test_context();
    let ns = app.metadata.namespace.clone().unwrap_or_default();
    let mut world = world.to_vec();
    for (name, secret) in prod_secrets(&ns) {
        world.push(secret.clone());
        let data = PROD_SECRET_DATA
            .iter()
            .filter(|(n, _, _)| *n == name)
            .map(|(_, k, v)| ((*k).to_owned(), v.as_bytes().to_vec()))
            .collect();
        ctx.caches
            .remember_referenced(Referenced::Secret, &ns, name, Some("41".into()), data);
    }
    seed(&ctx, &world);
    (ctx, handle)
}

fn note(b: &Value) -> &str {
    b["note"].as_str().unwrap_or_default()
}

#[tokio::test]
async fn first_reconcile_creates_every_child_then_reports_progressing() {
    let app = app_from_example(MINIMAL, "demo-ns");
    let p = Paths::of(&app);
    let script = vec![
        Expect::apply(p.sa(), |b| {
            assert_eq!(b["kind"], "ServiceAccount");
            assert_eq!(b["metadata"]["ownerReferences"][0]["kind"], "VmWebapp");
        }),
        Expect::apply(p.cm(), |b| assert_eq!(b["data"]["APP_ENV"], "local")),
        Expect::apply(p.svc(), |b| {
            assert_eq!(b["spec"]["ports"][0]["targetPort"], "http")
        }),
        Expect::apply(p.deployment(&p.api()), |b| {
            assert_eq!(b["apiVersion"], "apps/v1");
            assert_eq!(b["spec"]["replicas"], 1);
            assert_eq!(
                container(b)["args"],
                json!(["serve", "--host", "0.0.0.0", "--port", "8080"])
            );
        }),
        Expect::apply(p.deployment(&p.worker()), |b| {
            assert_eq!(b["spec"]["replicas"], 0)
        }),
        Expect::apply(p.pdb(&p.api()), |b| {
            assert_eq!(b["spec"]["maxUnavailable"], 1)
        }),
        Expect::apply(p.pdb(&p.worker()), |_| {}),
        Expect::event("demo-ns", |b| {
            assert_eq!(
                (b["type"].as_str(), b["reason"].as_str()),
                (Some("Normal"), Some("Applied"))
            );
            assert!(note(b).contains("Deployment/demo-api"));
        }),
        Expect::apply(p.status(), |b| {
            assert_eq!(b["status"]["observedGeneration"], 1);
            assert_eq!(condition(b, "Progressing")["status"], "True");
            assert_eq!(condition(b, "Progressing")["reason"], "RollingOut");
            assert_eq!(condition(b, "Ready")["status"], "False");
            assert_eq!(condition(b, "Degraded")["status"], "False");
        }),
    ];
    let (result, _) = reconcile_with(app, &[], script).await;
    assert!(result.is_ok(), "{result:?}");
}

#[tokio::test]
async fn steady_state_pass_with_warm_caches_makes_no_request_at_all() {
    // Issue kind: every pass made 9 GETs plus one per Secret although the controller
    // already watched all of them; at a thousand VmWebapps that was the bottleneck.
    let mut app = app_from_example(MINIMAL, "demo-ns");
    let desired = minimal_desired(&app);
    app.status = Some(settled_status(&app, &desired));
    assert_eq!(
        status::find(app.status.as_ref(), "Ready").map(|c| c.status.as_str()),
        Some("True")
    );
    let (result, bodies) = reconcile_with(app, &world_of(&desired, false), vec![]).await;
    assert!(result.is_ok(), "{result:?}");
    assert!(bodies.is_empty());
}

#[tokio::test]
async fn steady_state_pass_of_the_production_example_with_warm_caches_makes_no_request() {
    // Six referenced Secrets, HPAs and PDBs: with warm caches still not one request.
    let mut app = app_from_example(PRODUCTION, "vm-prod");
    let desired = prod_desired(&app, &app.spec.image.clone());
    let up = |dep: &k8s_openapi::api::apps::v1::Deployment| {
        Rollout::of(Some(
            &serde_json::from_value(live(dep)).expect("deployment"),
        ))
    };
    // The status a previous pass wrote for exactly this state.
    let observed = Observed {
        generation: app.metadata.generation,
        spec_image: app.spec.image.clone(),
        api: up(&desired.api_deployment),
        worker: up(&desired.worker_deployment),
        api_min_ready: 2,
        worker_min_ready: 2,
        ..Observed::default()
    };
    app.status = Some(status::compute(
        None,
        &observed,
        k8s_openapi::jiff::Timestamp::from_second(1_600_000_000).expect("timestamp"),
    ));
    let (ctx, handle) = prod_context(&app, &world_of(&desired, false));
    let (result, bodies) = reconcile_in(app, ctx.clone(), handle, vec![]).await;
    assert!(result.is_ok(), "{result:?}");
    assert!(bodies.is_empty());
    let reads = ctx
        .metrics
        .reads
        .get_or_create(&crate::metrics::KindLabels { kind: "Secret" })
        .get();
    assert_eq!(reads, 0, "no Secret was read: the data cache answered");
}

#[tokio::test]
async fn secrets_not_read_yet_are_read_once_each_and_remembered_at_their_version() {
    let app = app_from_example(PRODUCTION, "vm-prod");
    let desired = prod_desired(&app, &app.spec.image.clone());
    let (ctx, handle) = test_context();
    let mut world = world_of(&desired, false);
    world.extend(prod_secrets("vm-prod").into_iter().map(|(_, s)| s));
    seed(&ctx, &world);
    let p = Paths::of(&app);
    // Cold data cache: one GET per referenced Secret, in name order, then the status.
    let mut script: Vec<Expect> = prod_secrets("vm-prod")
        .into_iter()
        .map(|(name, s)| Expect::get(p.secret(name), Reply::Object(s)))
        .collect();
    script.push(Expect::apply(p.status(), |_| {}));
    script.push(Expect::event("vm-prod", |b| {
        assert_eq!(b["reason"], "Ready")
    }));
    let (result, bodies) = reconcile_in(app.clone(), ctx.clone(), handle, script).await;
    assert!(result.is_ok(), "{result:?}");
    assert_no_secret_values(&bodies);
    assert_eq!(ctx.caches.cached_count(Referenced::Secret), 6);
    assert!(
        ctx.caches
            .referenced_data(Referenced::Secret, "vm-prod", "vm-db", Some("41"))
            .is_some(),
        "the next pass finds the data at this resourceVersion"
    );
    assert!(
        ctx.caches
            .referenced_data(Referenced::Secret, "vm-prod", "vm-db", Some("42"))
            .is_none(),
        "a moved resourceVersion is read again"
    );
}

#[tokio::test]
async fn quantities_the_server_rewrote_are_not_reapplied_and_the_app_becomes_ready() {
    // Without this, `cpu: "0.5"` (stored as `500m`) re-applied both Deployments every pass
    // and Ready stayed False with reason RollingOut forever.
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    let mut app = app_from_example(MINIMAL, "demo-ns");
    let requests = app.spec.api.resources.requests.get_or_insert_default();
    requests.insert("cpu".into(), Quantity("0.5".into()));
    requests.insert("memory".into(), Quantity("0.25Gi".into()));
    let p = Paths::of(&app);
    let desired = minimal_desired(&app);
    // As the API server stores it: canonical quantities, same applied-hash annotation.
    let mut world = world_of(&desired, false);
    let res = &mut world[3]["spec"]["template"]["spec"]["containers"][0]["resources"];
    res["requests"]["cpu"] = json!("500m");
    res["requests"]["memory"] = json!("256Mi");
    let script = vec![
        // No Deployment PATCH and no `Applied` event.
        Expect::apply(p.status(), |b| {
            assert_eq!(condition(b, "Ready")["status"], "True");
            assert_eq!(condition(b, "Progressing")["reason"], "Reconciled");
        }),
        Expect::event("demo-ns", |b| assert_eq!(b["reason"], "Ready")),
    ];
    let (result, _) = reconcile_with(app, &world, script).await;
    assert_eq!(
        result.expect("reconciles"),
        kube::runtime::controller::Action::requeue(std::time::Duration::from_secs(300)),
        "steady state, not a rollout"
    );
}

#[tokio::test]
async fn hand_edited_child_is_restored() {
    let app = app_from_example(MINIMAL, "demo-ns");
    let p = Paths::of(&app);
    let desired = minimal_desired(&app);
    let mut world = world_of(&desired, false);
    world[1]["data"]["LOG_LEVEL"] = json!("trace");
    let script = vec![
        Expect::apply(p.cm(), |b| assert_eq!(b["data"]["LOG_LEVEL"], "info")),
        Expect::event("demo-ns", |b| {
            assert!(note(b).contains("ConfigMap/demo-config"))
        }),
        Expect::apply(p.status(), |b| {
            assert_eq!(condition(b, "Ready")["status"], "True")
        }),
        Expect::event("demo-ns", |b| assert_eq!(b["reason"], "Ready")),
    ];
    let (result, _) = reconcile_with(app, &world, script).await;
    assert!(result.is_ok(), "{result:?}");
}

#[tokio::test]
async fn missing_secret_degrades_names_it_and_warns_without_touching_children() {
    // The API keys Secret is the one most likely to be forgotten when moving to
    // production; without it the new pods would crash-loop on VM_API_KEYS.
    let app = app_from_example(PRODUCTION, "vm-prod");
    let p = Paths::of(&app);
    let [_keys, db, owner, llm, redis, hooks] = prod_secrets("vm-prod");
    let world = vec![
        db.1.clone(),
        owner.1.clone(),
        llm.1.clone(),
        redis.1.clone(),
        hooks.1.clone(),
    ];
    let script = vec![
        // The data cache is cold: the Secrets that exist are read once each.
        Expect::get(p.secret(db.0), Reply::Object(db.1)),
        Expect::get(p.secret(owner.0), Reply::Object(owner.1)),
        Expect::get(p.secret(llm.0), Reply::Object(llm.1)),
        Expect::get(p.secret(redis.0), Reply::Object(redis.1)),
        Expect::get(p.secret(hooks.0), Reply::Object(hooks.1)),
        Expect::apply(p.status(), |b| {
            let d = condition(b, "Degraded");
            assert_eq!(
                (d["status"].as_str(), d["reason"].as_str()),
                (Some("True"), Some("SecretMissing"))
            );
            assert!(
                d["message"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("vm-api-keys/keys"),
                "{d}"
            );
            assert_eq!(condition(b, "Ready")["status"], "False");
        }),
        Expect::event("vm-prod", |b| {
            assert_eq!(
                (b["type"].as_str(), b["reason"].as_str()),
                (Some("Warning"), Some("SecretMissing"))
            );
            assert!(note(b).contains("vm-api-keys/keys"));
        }),
    ];
    let (result, bodies) = reconcile_with(app, &world, script).await;
    let action = result.expect("a missing secret is not a reconcile error");
    assert_eq!(
        action,
        kube::runtime::controller::Action::requeue(std::time::Duration::from_secs(300)),
        "not retried hot"
    );
    assert_no_secret_values(&bodies);
}

fn upgrading_app() -> VmWebapp {
    let mut app = app_from_example(PRODUCTION, "vm-prod");
    app.spec.image = "ghcr.io/vmwebapp/vm-webapp:0.2.0".into();
    app.metadata.generation = Some(2);
    app
}

const OLD: &str = "ghcr.io/vmwebapp/vm-webapp:0.1.0";
const NEW: &str = "ghcr.io/vmwebapp/vm-webapp:0.2.0";

/// The children of the production example running `OLD`, with the shared children already
/// at the new spec (they do not depend on the image) and `job` as the migration Job.
fn upgrade_world(app: &VmWebapp, job: Option<Value>) -> Vec<Value> {
    let old = prod_desired(app, OLD);
    let new = prod_desired(app, NEW);
    let mut world = world_of(&old, false);
    world[0] = live(&new.service_account);
    world[1] = live(&new.config_map);
    world[2] = live(&new.service);
    world.extend(job);
    world
}

#[tokio::test]
async fn new_image_starts_the_migration_job_and_keeps_deployments_on_the_old_image() {
    let app = upgrading_app();
    let p = Paths::of(&app);
    let (ctx, handle) = prod_context(&app, &upgrade_world(&app, None));
    let script = vec![
        Expect::apply(p.job(NEW), |b| {
            let c = &b["spec"]["template"]["spec"]["containers"][0];
            assert_eq!(c["image"], NEW);
            assert_eq!(c["args"], json!(["migrate"]));
            assert_eq!(
                b["metadata"]["annotations"]["webapp.vm.dev/generation"],
                "2"
            );
        }),
        // No Deployment PATCH: they stay on the old image while the Job runs.
        Expect::event("vm-prod", |b| assert!(note(b).contains("Job/vm-migrate-"))),
        Expect::apply(p.status(), |b| {
            assert_eq!(condition(b, "Progressing")["reason"], "MigrationRunning");
            assert_eq!(b["status"]["servingImage"], OLD);
        }),
        Expect::event("vm-prod", |b| assert_eq!(b["reason"], "MigrationStarted")),
    ];
    let (result, bodies) = reconcile_in(app, ctx, handle, script).await;
    assert!(result.is_ok(), "{result:?}");
    assert_no_secret_values(&bodies);
}

#[tokio::test]
async fn succeeded_migration_moves_both_deployments_to_the_new_image() {
    let app = upgrading_app();
    let p = Paths::of(&app);
    let new = prod_desired(&app, NEW);
    let mut job = live(new.migration_job.as_ref().expect("job"));
    job["status"] = json!({"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]});
    let (ctx, handle) = prod_context(&app, &upgrade_world(&app, Some(job.clone())));
    let script = vec![
        // Created without a TTL (a failed Job must stay); a succeeded one is kept for a day.
        Expect::merge_patch(
            p.job(NEW),
            |b| assert_eq!(b, &json!({"spec": {"ttlSecondsAfterFinished": 86400}})),
            job,
        ),
        Expect::apply(p.deployment(&p.api()), |b| {
            assert_eq!(container(b)["image"], NEW);
            assert!(b["spec"].get("replicas").is_none(), "the HPA owns replicas");
        }),
        Expect::apply(p.deployment(&p.worker()), |b| {
            assert_eq!(container(b)["image"], NEW)
        }),
        Expect::event("vm-prod", |b| assert_eq!(b["reason"], "Applied")),
        Expect::apply(p.status(), |b| {
            assert_eq!(condition(b, "Progressing")["reason"], "RollingOut");
            assert_eq!(condition(b, "Degraded")["status"], "False");
        }),
    ];
    let (result, bodies) = reconcile_in(app, ctx, handle, script).await;
    assert!(result.is_ok(), "{result:?}");
    assert_no_secret_values(&bodies);
}

#[tokio::test]
async fn failed_migration_keeps_the_old_image_and_reports_migration_failed() {
    let app = upgrading_app();
    let p = Paths::of(&app);
    let new = prod_desired(&app, NEW);
    let mut job = live(new.migration_job.as_ref().expect("job"));
    job["status"] = json!({"failed": 3, "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]});
    let (ctx, handle) = prod_context(&app, &upgrade_world(&app, Some(job)));
    let script = vec![
        Expect::apply(p.status(), |b| {
            let d = condition(b, "Degraded");
            assert_eq!(
                (d["status"].as_str(), d["reason"].as_str()),
                (Some("True"), Some("MigrationFailed"))
            );
            assert_eq!(b["status"]["servingImage"], OLD);
            assert_eq!(condition(b, "Ready")["status"], "False");
        }),
        Expect::event("vm-prod", |b| {
            assert_eq!(
                (b["type"].as_str(), b["reason"].as_str()),
                (Some("Warning"), Some("MigrationFailed"))
            );
        }),
    ];
    let (result, _) = reconcile_in(app, ctx, handle, script).await;
    assert!(result.is_ok(), "{result:?}");
}

#[tokio::test]
async fn failed_migration_is_retried_after_the_next_spec_change() {
    let mut app = upgrading_app();
    app.metadata.generation = Some(3);
    let p = Paths::of(&app);
    let new = prod_desired(&app, NEW);
    // The failed Job was created for generation 2.
    let mut job = live(new.migration_job.as_ref().expect("job"));
    job["metadata"]["annotations"]["webapp.vm.dev/generation"] = json!("2");
    job["status"] = json!({"failed": 3, "conditions": [{"type": "Failed", "status": "True"}]});
    let (ctx, handle) = prod_context(&app, &upgrade_world(&app, Some(job)));
    let script = vec![
        Expect::delete(p.job(NEW)),
        Expect::event("vm-prod", |b| {
            assert!(note(b).contains("deleted failed Job"))
        }),
        Expect::apply(p.status(), |b| {
            assert_eq!(condition(b, "Progressing")["reason"], "MigrationRunning")
        }),
        Expect::event("vm-prod", |b| assert_eq!(b["reason"], "MigrationStarted")),
    ];
    let (result, _) = reconcile_in(app, ctx, handle, script).await;
    assert!(result.is_ok(), "{result:?}");
}

#[tokio::test]
async fn suspended_resource_only_reports_status() {
    let mut app = app_from_example(MINIMAL, "demo-ns");
    app.spec.suspend = true;
    let p = Paths::of(&app);
    let script = vec![Expect::apply(p.status(), |b| {
        assert_eq!(condition(b, "Progressing")["reason"], "Suspended")
    })];
    let (result, _) = reconcile_with(app, &[], script).await;
    assert!(result.is_ok(), "{result:?}");
}

#[tokio::test]
async fn an_unexpected_request_fails_the_reconcile() {
    // Guards the harness itself: a pass that makes more requests than scripted must fail.
    let app = app_from_example(MINIMAL, "demo-ns");
    let p = Paths::of(&app);
    let script = vec![Expect::apply(p.sa(), |_| {})];
    let (result, _) = reconcile_with(app, &[], script).await;
    assert!(result.is_err());
}

#[test]
fn backoff_grows_per_object_and_caps_at_five_minutes() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let _guard = rt.enter();
    let (ctx, _handle) = test_context();
    let delays: Vec<u64> = (0..8).map(|_| ctx.backoff("ns/a").as_secs()).collect();
    assert_eq!(delays, [5, 10, 20, 40, 80, 160, 300, 300]);
    assert_eq!(
        ctx.backoff("ns/b").as_secs(),
        5,
        "another object has its own count"
    );
    // Without pruning the map grew by one entry per resource that ever failed.
    ctx.prune_failures(|key| key == "ns/b");
    assert_eq!(ctx.failure_count("ns/a"), 0);
    assert_eq!(ctx.failure_count("ns/b"), 1);
}

/// The minimal example in a steady state with `api_hpa` as the live API HPA.
fn minimal_with_live_hpa(
    app: &VmWebapp,
    api_hpa: Value,
    delete: bool,
) -> (Vec<Value>, Vec<Expect>) {
    let p = Paths::of(app);
    let desired = minimal_desired(app);
    let mut world = world_of(&desired, false);
    world.push(api_hpa);
    let mut script = vec![];
    if delete {
        script.push(Expect::delete(p.hpa(&p.api())));
        script.push(Expect::event("demo-ns", |b| {
            assert!(note(b).contains("deleted HorizontalPodAutoscaler/demo-api"))
        }));
    }
    script.push(Expect::apply(p.status(), |b| {
        assert_eq!(condition(b, "Ready")["status"], "True")
    }));
    script.push(Expect::event("demo-ns", |b| {
        assert_eq!(b["reason"], "Ready")
    }));
    (world, script)
}

fn api_hpa_of(app: &VmWebapp) -> Value {
    let mut scaled = app.clone();
    scaled.spec.api.autoscaling = Some(crate::crd::AutoscalingSpec {
        min_replicas: 1,
        max_replicas: 3,
        target_cpu_utilization_percentage: 70,
    });
    live(
        builders::build(&scaled, &Inputs::offline(&scaled))
            .expect("builds")
            .api_hpa
            .as_ref()
            .expect("hpa"),
    )
}

#[tokio::test]
async fn turning_autoscaling_off_deletes_our_hpa() {
    let app = app_from_example(MINIMAL, "demo-ns");
    let (world, script) = minimal_with_live_hpa(&app, api_hpa_of(&app), true);
    let (result, _) = reconcile_with(app, &world, script).await;
    assert!(result.is_ok(), "{result:?}");
}

#[tokio::test]
async fn an_hpa_someone_else_owns_is_left_alone() {
    let app = app_from_example(MINIMAL, "demo-ns");
    let mut foreign = api_hpa_of(&app);
    foreign["metadata"]["ownerReferences"][0]["uid"] = json!("someone-else");
    let (world, script) = minimal_with_live_hpa(&app, foreign, false);
    let (result, _) = reconcile_with(app, &world, script).await;
    assert!(result.is_ok(), "{result:?}");
}

#[tokio::test]
async fn turning_autoscaling_on_hands_replicas_over_before_dropping_them() {
    // Without this the first apply without `replicas` removed the field the operator owned
    // and the Deployment fell back to 1 replica until the HPA scaled it up again.
    let mut before = app_from_example(MINIMAL, "demo-ns");
    before.spec.api.replicas = 3;
    let was = minimal_desired(&before);
    let mut live_api = live(&was.api_deployment);
    live_api["metadata"]["managedFields"] = json!([{
        "manager": "vm-operator", "operation": "Apply", "fieldsType": "FieldsV1",
        "fieldsV1": {"f:spec": {"f:replicas": {}, "f:template": {}}}
    }]);
    let mut app = before.clone();
    app.spec.api.autoscaling = Some(crate::crd::AutoscalingSpec {
        min_replicas: 2,
        max_replicas: 6,
        target_cpu_utilization_percentage: 70,
    });
    let p = Paths::of(&app);
    let desired = minimal_desired(&app);
    let mut world = world_of(&desired, false);
    world[3] = live_api;
    world.retain(|o| o["kind"] != "HorizontalPodAutoscaler");
    let script = vec![
        // 1. The live count, claimed by a second manager, so it survives step 2.
        Expect::apply_as(
            p.deployment(&p.api()),
            "vm-operator-replicas-handover",
            |b| {
                assert_eq!(b["spec"], json!({"replicas": 3}));
                assert_eq!(b["metadata"], json!({"name": "demo-api"}));
            },
        ),
        // The HPA, in parallel with the handover.
        Expect::apply(p.hpa(&p.api()), |b| assert_eq!(b["spec"]["minReplicas"], 2)),
        // 2. The operator's own apply no longer sets replicas.
        Expect::apply(p.deployment(&p.api()), |b| {
            assert!(b["spec"].get("replicas").is_none(), "{b}");
        }),
        Expect::event("demo-ns", |b| {
            assert!(note(b).contains("replicas handed to the HPA"))
        }),
        Expect::apply(p.status(), |_| {}),
    ];
    let (result, _) = reconcile_with(app, &world, script).await;
    assert!(result.is_ok(), "{result:?}");
}

#[tokio::test]
async fn first_install_with_autoscaling_creates_deployments_at_min_replicas_and_is_not_ready_below()
{
    // Issue kind: created without `replicas` the Deployments ran one pod, the VmWebapp
    // turned Ready, then the HPA raised them to minReplicas and Ready flipped (a GitOps
    // healthy → progressing → healthy flap).
    let app = app_from_example(PRODUCTION, "vm-prod");
    let p = Paths::of(&app);
    let d = prod_desired(&app, &app.spec.image.clone());
    // The migration for the first image succeeded; nothing else exists yet.
    let mut job = live(d.migration_job.as_ref().expect("job"));
    job["status"] = json!({"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]});
    job["spec"]["ttlSecondsAfterFinished"] = json!(86400);
    let world = vec![
        live(&d.service_account),
        live(&d.config_map),
        live(&d.service),
        job,
    ];
    let (ctx, handle) = prod_context(&app, &world);
    let script = vec![
        Expect::apply(p.deployment(&p.api()), |b| {
            assert_eq!(b["spec"]["replicas"], 2, "API at its HPA's minReplicas")
        }),
        Expect::apply(p.deployment(&p.worker()), |b| {
            assert_eq!(b["spec"]["replicas"], 2, "worker at its HPA's minReplicas")
        }),
        Expect::apply(p.pdb(&p.api()), |_| {}),
        Expect::apply(p.pdb(&p.worker()), |_| {}),
        Expect::apply(p.hpa(&p.api()), |b| assert_eq!(b["spec"]["minReplicas"], 2)),
        Expect::apply(p.hpa(&p.worker()), |b| {
            assert_eq!(b["spec"]["minReplicas"], 2)
        }),
        Expect::event("vm-prod", |b| assert_eq!(b["reason"], "Applied")),
        Expect::apply(p.status(), |b| {
            assert_eq!(condition(b, "Ready")["status"], "False");
            assert_eq!(condition(b, "Progressing")["reason"], "RollingOut");
        }),
    ];
    let (result, _) = reconcile_in(app.clone(), ctx, handle, script).await;
    assert!(result.is_ok(), "{result:?}");

    // Later: one API pod is available of the two the HPA minimum asks for. Not Ready.
    let later = prod_desired(&app, &app.spec.image.clone());
    let mut world = world_of(&later, false);
    world[3]["spec"]["replicas"] = json!(2);
    world[3]["status"] = json!({"observedGeneration": 1, "replicas": 1, "updatedReplicas": 1,
        "readyReplicas": 1, "availableReplicas": 1});
    let (ctx, handle) = prod_context(&app, &world);
    let script = vec![Expect::apply(p.status(), |b| {
        assert_eq!(condition(b, "Ready")["status"], "False");
        assert!(
            condition(b, "Ready")["message"]
                .as_str()
                .unwrap_or_default()
                .contains("1 of 2 API"),
            "{b}"
        );
    })];
    let (result, _) = reconcile_in(app, ctx, handle, script).await;
    assert!(result.is_ok(), "{result:?}");
}

/// Asserts a status patch reports `child` refused with the server's `message`.
fn assert_apply_failed(b: &Value, child: &str, message: &str) {
    assert!(b["status"]["observedGeneration"].as_i64().is_some(), "{b}");
    let d = condition(b, "Degraded");
    assert_eq!(
        (d["status"].as_str(), d["reason"].as_str()),
        (Some("True"), Some("ApplyFailed")),
        "{b}"
    );
    let text = d["message"].as_str().unwrap_or_default();
    assert!(text.contains(child), "{text}");
    assert!(text.contains(message), "{text}");
    assert_eq!(condition(b, "Ready")["status"], "False");
}

#[tokio::test]
async fn a_refused_apply_of_each_child_kind_is_reported_in_status_and_a_warning_event() {
    // Issue kind: a write the API server refused (quota, admission, validation) left the
    // VmWebapp with no status and no event; only the operator's log knew.
    let app = app_from_example(MINIMAL, "demo-ns");
    let p = Paths::of(&app);
    let desired = minimal_desired(&app);
    let cases: [(usize, String, &str, Reply); 6] = [
        (0, p.sa(), "ServiceAccount/demo", Reply::quota_exceeded("serviceaccounts", "demo")),
        (1, p.cm(), "ConfigMap/demo-config", Reply::Status(422, "Invalid",
            "ConfigMap \"demo-config\" is invalid: data: Too long: must have at most 1048576 bytes".into())),
        (2, p.svc(), "Service/demo", Reply::Status(422, "Invalid",
            "Service \"demo\" is invalid: spec.clusterIPs: Internal error: failed to allocate a serviceIP: range is full".into())),
        (3, p.deployment(&p.api()), "Deployment/demo-api", Reply::quota_exceeded("deployments.apps", "demo-api")),
        (4, p.deployment(&p.worker()), "Deployment/demo-worker", Reply::Status(403, "Forbidden",
            "admission webhook \"policy.example.com\" denied the request: images must come from registry.example.com".into())),
        (5, p.pdb(&p.api()), "PodDisruptionBudget/demo-api", Reply::quota_exceeded("poddisruptionbudgets.policy", "demo-api")),
    ];
    for (index, path, child, reply) in cases {
        let message = match &reply {
            Reply::Status(_, _, m) => m.clone(),
            _ => unreachable!("a refusal"),
        };
        let mut world = world_of(&desired, false);
        world.remove(index);
        let child_owned = child.to_owned();
        let expected = message.clone();
        let expected_note = message.clone();
        let script = vec![
            Expect::apply(path, |_| {}).answer(reply),
            Expect::apply(p.status(), move |b| {
                assert_apply_failed(b, &child_owned, &expected)
            }),
            Expect::event("demo-ns", move |b| {
                assert_eq!(
                    (b["type"].as_str(), b["reason"].as_str()),
                    (Some("Warning"), Some("ApplyFailed"))
                );
                assert!(note(b).contains(&expected_note[..40]), "{b}");
            }),
        ];
        let (ctx, handle) = test_context();
        seed(&ctx, &world);
        let (result, _) = reconcile_in(app.clone(), ctx.clone(), handle, script).await;
        assert_eq!(
            result.expect("a refusal does not fail the pass"),
            kube::runtime::controller::Action::requeue(std::time::Duration::from_secs(5)),
            "{child}: retried with backoff, not hot"
        );
        assert_eq!(ctx.failure_count("demo-ns/demo"), 1, "{child}");
        let kind = child.split('/').next().unwrap_or_default();
        let kind: &'static str = match kind {
            "ServiceAccount" => "ServiceAccount",
            "ConfigMap" => "ConfigMap",
            "Service" => "Service",
            "Deployment" => "Deployment",
            _ => "PodDisruptionBudget",
        };
        assert_eq!(
            ctx.metrics
                .refused
                .get_or_create(&crate::metrics::KindLabels { kind })
                .get(),
            1,
            "{child}"
        );
    }
}

#[tokio::test]
async fn refused_hpa_and_migration_job_are_reported_too() {
    let app = upgrading_app();
    let p = Paths::of(&app);
    // The Job for the new image: refused by a quota on Jobs.
    let (ctx, handle) = prod_context(&app, &upgrade_world(&app, None));
    let script = vec![
        Expect::apply(p.job(NEW), |_| {}).answer(Reply::quota_exceeded("jobs.batch", "vm-migrate")),
        Expect::apply(p.status(), |b| {
            assert_apply_failed(b, "Job/vm-migrate-", "exceeded quota")
        }),
        Expect::event("vm-prod", |b| assert_eq!(b["reason"], "ApplyFailed")),
    ];
    let (result, bodies) = reconcile_in(app, ctx, handle, script).await;
    assert!(result.is_ok(), "{result:?}");
    assert_no_secret_values(&bodies);

    // The API HPA: refused by a policy.
    let app = app_from_example(PRODUCTION, "vm-prod");
    let d = prod_desired(&app, &app.spec.image.clone());
    let mut world = world_of(&d, false);
    world
        .retain(|o| !(o["kind"] == "HorizontalPodAutoscaler" && o["metadata"]["name"] == "vm-api"));
    let (ctx, handle) = prod_context(&app, &world);
    let script = vec![
        Expect::apply(p.hpa("vm-api"), |_| {}).answer(Reply::Status(
            422,
            "Invalid",
            "HorizontalPodAutoscaler.autoscaling \"vm-api\" is invalid: spec.maxReplicas: Invalid value: 10: must be less than or equal to 5".into(),
        )),
        Expect::apply(p.status(), |b| {
            assert_apply_failed(b, "HorizontalPodAutoscaler/vm-api", "must be less than or equal to 5")
        }),
        Expect::event("vm-prod", |b| assert_eq!(b["type"], "Warning")),
    ];
    let (result, _) = reconcile_in(app, ctx, handle, script).await;
    assert!(result.is_ok(), "{result:?}");
}

#[tokio::test]
async fn a_refusal_that_echoes_a_secret_value_is_redacted() {
    // The API server's messages are reported verbatim; a webhook that quoted an env
    // value must still not put a Secret value into status or events.
    let app = upgrading_app();
    let p = Paths::of(&app);
    let (ctx, handle) = prod_context(&app, &upgrade_world(&app, None));
    let script = vec![
        Expect::apply(p.job(NEW), |_| {}).answer(Reply::Status(
            403,
            "Forbidden",
            "admission webhook \"x\" denied the request: env value postgres://user:db-password@db/vm is not allowed".into(),
        )),
        Expect::apply(p.status(), |b| assert_apply_failed(b, "Job/", "[redacted]")),
        Expect::event("vm-prod", |_| {}),
    ];
    let (result, bodies) = reconcile_in(app, ctx, handle, script).await;
    assert!(result.is_ok(), "{result:?}");
    assert_no_secret_values(&bodies);
}

#[tokio::test]
async fn recovery_after_a_refusal_clears_the_condition_and_the_failure_count() {
    let mut app = app_from_example(MINIMAL, "demo-ns");
    let p = Paths::of(&app);
    let desired = minimal_desired(&app);
    // The previous pass was refused by the quota.
    let refused = Observed {
        generation: Some(1),
        spec_image: app.spec.image.clone(),
        refused: vec!["Deployment/demo-api: exceeded quota (HTTP 403 Forbidden)".into()],
        api_min_ready: 1,
        ..Observed::default()
    };
    app.status = Some(status::compute(None, &refused, crate::fixtures::test_now()));
    let mut world = world_of(&desired, false);
    world.remove(3);
    let (ctx, handle) = test_context();
    seed(&ctx, &world);
    ctx.backoff("demo-ns/demo");
    let script = vec![
        Expect::apply(p.deployment(&p.api()), |_| {}),
        Expect::event("demo-ns", |b| assert_eq!(b["reason"], "Applied")),
        Expect::apply(p.status(), |b| {
            let d = condition(b, "Degraded");
            assert_eq!(
                (d["status"].as_str(), d["reason"].as_str()),
                (Some("False"), Some("AsExpected"))
            );
            assert_eq!(condition(b, "Progressing")["reason"], "RollingOut");
        }),
    ];
    let (result, _) = reconcile_in(app, ctx.clone(), handle, script).await;
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(
        ctx.failure_count("demo-ns/demo"),
        0,
        "success resets the backoff"
    );
}

#[tokio::test]
async fn a_streak_of_server_errors_is_reported_after_the_third_failure() {
    let app = app_from_example(MINIMAL, "demo-ns");
    let p = Paths::of(&app);
    let server_error = || {
        Reply::Status(
            500,
            "InternalError",
            "Internal error occurred: etcdserver: request timed out".into(),
        )
    };
    // Failures one and two: retried, the status is left alone.
    for _ in 0..2 {
        let (ctx, handle) = test_context();
        seed(&ctx, &[]);
        ctx.failures
            .lock()
            .expect("lock")
            .insert("demo-ns/demo".into(), 0);
        let script = vec![
            Expect::apply(p.sa(), |_| {}).answer(server_error()),
            Expect::apply(p.cm(), |_| {}).answer(server_error()),
            Expect::apply(p.svc(), |_| {}).answer(server_error()),
        ];
        let (result, _) = reconcile_in(app.clone(), ctx, handle, script).await;
        assert!(result.is_err(), "a 5xx is retried, not a refusal");
    }
    // The third in a row: still an error (backoff), and now the status says so.
    let (ctx, handle) = test_context();
    seed(&ctx, &[]);
    ctx.failures
        .lock()
        .expect("lock")
        .insert("demo-ns/demo".into(), 2);
    let script = vec![
        Expect::apply(p.sa(), |_| {}).answer(server_error()),
        Expect::apply(p.cm(), |_| {}).answer(server_error()),
        Expect::apply(p.svc(), |_| {}).answer(server_error()),
        Expect::apply(p.status(), |b| {
            let d = condition(b, "Degraded");
            assert_eq!(
                (d["status"].as_str(), d["reason"].as_str()),
                (Some("True"), Some("ApiErrors"))
            );
            assert!(
                d["message"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("etcdserver"),
                "{d}"
            );
            assert_eq!(b["status"]["observedGeneration"], 1);
        }),
        Expect::event("demo-ns", |b| {
            assert_eq!(
                (b["type"].as_str(), b["reason"].as_str()),
                (Some("Warning"), Some("ApiErrors"))
            )
        }),
    ];
    let (result, _) = reconcile_in(app, ctx, handle, script).await;
    assert!(result.is_err());
}

#[tokio::test]
async fn a_conflict_is_retried_not_reported_as_a_refusal() {
    let app = app_from_example(MINIMAL, "demo-ns");
    let p = Paths::of(&app);
    let desired = minimal_desired(&app);
    let mut world = world_of(&desired, false);
    world.remove(1);
    let script = vec![Expect::apply(p.cm(), |_| {}).answer(Reply::Status(
        409,
        "Conflict",
        "Operation cannot be fulfilled on configmaps \"demo-config\": the object has been modified".into(),
    ))];
    let (result, _) = reconcile_with(app, &world, script).await;
    assert!(matches!(result, Err(super::Error::Kube(_))), "{result:?}");
}

#[tokio::test]
async fn a_secret_deleted_after_the_cache_saw_it_counts_as_missing() {
    // The metadata cache may lag a deletion; the GET that finds nothing must not fail the
    // pass but report the Secret as missing.
    let app = app_from_example(PRODUCTION, "vm-prod");
    let p = Paths::of(&app);
    let world: Vec<Value> = prod_secrets("vm-prod")
        .into_iter()
        .map(|(_, s)| s)
        .collect();
    let mut script: Vec<Expect> = prod_secrets("vm-prod")
        .into_iter()
        .map(|(name, s)| {
            let reply = if name == "vm-redis" {
                Reply::NotFound
            } else {
                Reply::Object(s)
            };
            Expect::get(p.secret(name), reply)
        })
        .collect();
    script.push(Expect::apply(p.status(), |b| {
        assert_eq!(condition(b, "Degraded")["reason"], "SecretMissing");
        assert!(
            condition(b, "Degraded")["message"]
                .as_str()
                .unwrap_or_default()
                .contains("vm-redis/url")
        );
    }));
    script.push(Expect::event("vm-prod", |b| {
        assert_eq!(b["reason"], "SecretMissing")
    }));
    let (result, bodies) = reconcile_with(app, &world, script).await;
    assert!(result.is_ok(), "{result:?}");
    assert_no_secret_values(&bodies);
}

// ---------------------------------------------------------------------------
// Scheduled backups (spec.backup)
// ---------------------------------------------------------------------------

/// The minimal example with nightly backups to the claim `vm-backups`, already settled.
fn with_backup() -> (VmWebapp, Desired) {
    let mut app = app_from_example(MINIMAL, "demo-ns");
    app.spec.backup = Some(crate::crd::BackupSpec {
        schedule: "30 2 * * *".into(),
        retention: 14,
        claim_name: "vm-backups".into(),
        active_deadline_seconds: 3600,
        suspend: false,
    });
    let desired = minimal_desired(&app);
    app.status = Some(settled_status(&app, &desired));
    (app, desired)
}

fn cron_path(p: &Paths) -> String {
    p.group("batch/v1", "cronjobs", &names::backup(&p.name))
}

#[tokio::test]
async fn spec_backup_creates_a_cron_job_writing_to_the_claim_and_reports_it() {
    let (app, desired) = with_backup();
    let p = Paths::of(&app);
    let script = vec![
        Expect::apply(cron_path(&p), |b| {
            assert_eq!(b["kind"], "CronJob");
            assert_eq!(b["metadata"]["ownerReferences"][0]["kind"], "VmWebapp");
            assert_eq!(b["spec"]["schedule"], "30 2 * * *");
            assert_eq!(b["spec"]["timeZone"], "Etc/UTC");
            assert_eq!(b["spec"]["concurrencyPolicy"], "Forbid");
            let pod = &b["spec"]["jobTemplate"]["spec"]["template"]["spec"];
            assert_eq!(
                pod["containers"][0]["args"],
                json!(["backup", "--output-dir", "/var/backups/vm", "--keep", "14"])
            );
            assert_eq!(pod["restartPolicy"], "Never");
            let claim = pod["volumes"]
                .as_array()
                .and_then(|v| v.iter().find(|v| v["name"] == "backups"))
                .expect("backups volume");
            assert_eq!(claim["persistentVolumeClaim"]["claimName"], "vm-backups");
        }),
        Expect::event("demo-ns", |b| {
            assert!(note(b).contains("CronJob/demo-backup"), "{b}")
        }),
        Expect::apply(p.status(), |b| {
            let backup = &b["status"]["backup"];
            // The cache did not hold the CronJob yet; its watch triggers the next pass.
            assert_eq!(backup["maxAgeSeconds"], 86_400 + 3600);
            assert!(backup.get("lastSuccessfulTime").is_none(), "{b}");
            assert_eq!(condition(b, "Ready")["status"], "True");
        }),
    ];
    let (result, _) = reconcile_with(app, &world_of(&desired, false), script).await;
    assert!(result.is_ok(), "{result:?}");
}

#[tokio::test]
async fn the_cron_jobs_last_successful_time_reaches_the_status_and_then_nothing_is_written() {
    // Without this the status (and the VmWebappBackupStale alert, which reads it) never
    // learns that backups succeed.
    let (mut app, desired) = with_backup();
    let p = Paths::of(&app);
    let mut cron = live(desired.backup_cron_job.as_ref().expect("cron job"));
    cron["status"] = json!({
        "lastScheduleTime": "2025-06-01T02:30:00Z",
        "lastSuccessfulTime": "2025-06-01T02:30:41Z"
    });
    let mut world = world_of(&desired, false);
    world.push(cron);
    let script = vec![Expect::apply(p.status(), |b| {
        let backup = &b["status"]["backup"];
        assert_eq!(backup["cronJob"], "demo-backup");
        assert_eq!(backup["lastSuccessfulTime"], "2025-06-01T02:30:41Z");
        assert_eq!(backup["lastScheduleTime"], "2025-06-01T02:30:00Z");
        assert_eq!(backup["configuredTime"], "2025-01-01T00:00:00Z");
    })];
    let (result, bodies) = reconcile_with(app.clone(), &world, script).await;
    assert!(result.is_ok(), "{result:?}");

    // The next pass sees its own status: a steady state makes no request at all.
    let written: Value = serde_json::from_str(&bodies[0]).expect("status body");
    app.status = Some(serde_json::from_value(written["status"].clone()).expect("status"));
    let (result, bodies) = reconcile_with(app, &world, vec![]).await;
    assert!(result.is_ok(), "{result:?}");
    assert!(bodies.is_empty(), "{bodies:?}");
}

#[tokio::test]
async fn removing_spec_backup_deletes_our_cron_job() {
    let (with, desired) = with_backup();
    let mut app = app_from_example(MINIMAL, "demo-ns");
    app.status = with.status.clone();
    let p = Paths::of(&app);
    let mut world = world_of(&desired, false);
    world.push(live(desired.backup_cron_job.as_ref().expect("cron job")));
    let script = vec![
        Expect::delete(cron_path(&p)),
        Expect::event("demo-ns", |b| {
            assert!(note(b).contains("deleted CronJob/demo-backup"), "{b}")
        }),
    ];
    let (result, _) = reconcile_with(app, &world, script).await;
    assert!(result.is_ok(), "{result:?}");
}

#[tokio::test]
async fn an_unreadable_backup_schedule_degrades_with_invalid_spec_and_applies_nothing() {
    let (mut app, desired) = with_backup();
    if let Some(b) = app.spec.backup.as_mut() {
        b.schedule = "every night".into();
    }
    let p = Paths::of(&app);
    let script = vec![
        Expect::apply(p.status(), |b| {
            assert_eq!(condition(b, "Degraded")["reason"], "InvalidSpec");
            let message = condition(b, "Degraded")["message"]
                .as_str()
                .unwrap_or_default();
            assert!(message.contains("spec.backup.schedule"), "{message}");
        }),
        Expect::event("demo-ns", |b| assert_eq!(b["type"], "Warning")),
    ];
    let (result, _) = reconcile_with(app, &world_of(&desired, false), script).await;
    assert!(result.is_ok(), "{result:?}");
}

// ---------------------------------------------------------------------------
// Tenant plans (spec.plans)
// ---------------------------------------------------------------------------

/// A ConfigMap `plans` holding `text` under `plans.yaml`, at `resource_version`.
fn plans_config_map(ns: &str, resource_version: &str, text: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "plans", "namespace": ns, "resourceVersion": resource_version},
        "data": {"plans.yaml": text},
    })
}

/// The minimal example with `spec.plans`, its children built and settled with `text`.
fn with_plans(text: &str) -> (VmWebapp, Desired) {
    let mut app = app_from_example(MINIMAL, "demo-ns");
    app.spec.plans = Some(crate::crd::ConfigMapKeyRef {
        name: "plans".into(),
        key: "plans.yaml".into(),
    });
    let mut inputs = Inputs::offline(&app);
    inputs.plans = Some(text.into());
    let desired = builders::build(&app, &inputs).expect("builds");
    app.status = Some(settled_status(&app, &desired));
    (app, desired)
}

#[tokio::test]
async fn an_edited_plans_config_map_is_read_once_and_rolls_the_api_and_worker() {
    // Without the hash the app would keep enforcing the old allowances: it reads the
    // plans file only at start-up.
    let (app, before) = with_plans("default_plan: free\n");
    let (_, after) = with_plans("default_plan: pro\n");
    assert_ne!(before.config_hash, after.config_hash);
    let p = Paths::of(&app);
    let edited = plans_config_map("demo-ns", "8", "default_plan: pro\n");
    let mut world = world_of(&before, false);
    world.push(edited.clone());
    let hash = after.config_hash.clone();
    let annotation = |b: &Value| {
        b["spec"]["template"]["metadata"]["annotations"]["webapp.vm.dev/config-hash"].clone()
    };
    let script = vec![
        Expect::get(p.core("configmaps", "plans"), Reply::Object(edited)),
        Expect::apply(p.deployment(&p.api()), {
            let hash = hash.clone();
            move |b| {
                assert_eq!(annotation(b), json!(hash));
                assert_eq!(
                    container(b)["env"]
                        .as_array()
                        .map(|e| e.iter().any(|v| v["name"] == "VM_PLANS_FILE")),
                    Some(true)
                );
            }
        }),
        Expect::apply(p.deployment(&p.worker()), move |b| {
            assert_eq!(annotation(b), json!(hash))
        }),
        Expect::event("demo-ns", |b| assert_eq!(b["reason"], "Applied")),
        Expect::apply(p.status(), |b| {
            assert_eq!(condition(b, "Progressing")["reason"], "RollingOut")
        }),
    ];
    let (ctx, handle) = test_context();
    seed(&ctx, &world);
    let (result, _) = reconcile_in(app.clone(), ctx.clone(), handle, script).await;
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(ctx.caches.cached_count(Referenced::ConfigMap), 1);
    assert!(
        ctx.caches
            .referenced_data(Referenced::ConfigMap, "demo-ns", "plans", Some("8"))
            .is_some(),
        "the next pass finds the plans at this resourceVersion without a GET"
    );
}

#[tokio::test]
async fn a_missing_plans_config_map_degrades_and_warns_without_touching_children() {
    let (app, before) = with_plans("default_plan: free\n");
    let p = Paths::of(&app);
    let script = vec![
        Expect::apply(p.status(), |b| {
            let d = condition(b, "Degraded");
            assert_eq!(
                (d["status"].as_str(), d["reason"].as_str()),
                (Some("True"), Some("ConfigMapMissing"))
            );
            assert!(
                d["message"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("plans/plans.yaml"),
                "{d}"
            );
        }),
        Expect::event("demo-ns", |b| {
            assert_eq!(
                (b["type"].as_str(), b["reason"].as_str()),
                (Some("Warning"), Some("ConfigMapMissing"))
            )
        }),
    ];
    // The ConfigMap is absent from the metadata cache: no GET, no child write.
    let (result, _) = reconcile_with(app, &world_of(&before, false), script).await;
    assert_eq!(
        result.expect("a missing ConfigMap is not a reconcile error"),
        kube::runtime::controller::Action::requeue(std::time::Duration::from_secs(300)),
        "not retried hot"
    );
}

#[tokio::test]
async fn a_plans_config_map_without_the_key_counts_as_missing() {
    let (app, before) = with_plans("default_plan: free\n");
    let p = Paths::of(&app);
    let mut wrong_key = plans_config_map("demo-ns", "9", "x");
    wrong_key["data"] = json!({"other.yaml": "default_plan: free\n"});
    let mut world = world_of(&before, false);
    world.push(wrong_key.clone());
    let script = vec![
        Expect::get(p.core("configmaps", "plans"), Reply::Object(wrong_key)),
        Expect::apply(p.status(), |b| {
            assert_eq!(condition(b, "Degraded")["reason"], "ConfigMapMissing")
        }),
        Expect::event("demo-ns", |b| assert_eq!(b["reason"], "ConfigMapMissing")),
    ];
    let (result, _) = reconcile_with(app, &world, script).await;
    assert!(result.is_ok(), "{result:?}");
}
