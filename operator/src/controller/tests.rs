//! Mocked-API scenarios of the reconcile loop: each test lists, in order, every request a
//! pass must make (see the module docs of `controller`) and what the fake API server says.

use serde_json::{Value, json};

use crate::builders::{self, Desired, Inputs, names};
use crate::crd::VmWebapp;
use crate::fixtures::{Expect, Reply, app_from_example, live, reconcile_with, secret};
use crate::status::{self, Migration, Observed, Rollout};

const MINIMAL: &str = include_str!("../../examples/minimal.yaml");
const PRODUCTION: &str = include_str!("../../examples/production.yaml");

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

#[tokio::test]
async fn first_reconcile_creates_every_child_then_reports_progressing() {
    let app = app_from_example(MINIMAL, "demo-ns");
    let p = Paths::of(&app);
    let script = vec![
        Expect::get(p.deployment(&p.api()), Reply::NotFound),
        Expect::get(p.deployment(&p.worker()), Reply::NotFound),
        Expect::get(p.sa(), Reply::NotFound),
        Expect::apply(p.sa(), |b| {
            assert_eq!(b["kind"], "ServiceAccount");
            assert_eq!(b["metadata"]["ownerReferences"][0]["kind"], "VmWebapp");
        }),
        Expect::get(p.cm(), Reply::NotFound),
        Expect::apply(p.cm(), |b| assert_eq!(b["data"]["APP_ENV"], "local")),
        Expect::get(p.svc(), Reply::NotFound),
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
        Expect::get(p.pdb(&p.api()), Reply::NotFound),
        Expect::apply(p.pdb(&p.api()), |b| {
            assert_eq!(b["spec"]["maxUnavailable"], 1)
        }),
        Expect::get(p.pdb(&p.worker()), Reply::NotFound),
        Expect::apply(p.pdb(&p.worker()), |_| {}),
        Expect::get(p.hpa(&p.api()), Reply::NotFound),
        Expect::get(p.hpa(&p.worker()), Reply::NotFound),
        Expect::event("demo-ns", |b| {
            assert_eq!(
                (b["type"].as_str(), b["reason"].as_str()),
                (Some("Normal"), Some("Applied"))
            );
            assert!(
                b["note"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("Deployment/demo-api")
            );
        }),
        Expect::apply(p.status(), |b| {
            assert_eq!(b["status"]["observedGeneration"], 1);
            assert_eq!(condition(b, "Progressing")["status"], "True");
            assert_eq!(condition(b, "Progressing")["reason"], "RollingOut");
            assert_eq!(condition(b, "Ready")["status"], "False");
            assert_eq!(condition(b, "Degraded")["status"], "False");
        }),
    ];
    let (result, _) = reconcile_with(app, script).await;
    assert!(result.is_ok(), "{result:?}");
}

#[tokio::test]
async fn steady_state_reconcile_reads_but_writes_nothing() {
    let mut app = app_from_example(MINIMAL, "demo-ns");
    let p = Paths::of(&app);
    let desired = builders::build(&app, &Inputs::offline(&app)).expect("builds");
    // The status a previous pass wrote for exactly this state.
    let up = |d: &k8s_openapi::api::apps::v1::Deployment| {
        let v = live(d);
        Rollout::of(Some(&serde_json::from_value(v).expect("deployment")))
    };
    let observed = Observed {
        generation: Some(1),
        spec_image: app.spec.image.clone(),
        suspended: false,
        missing_secrets: vec![],
        invalid_spec: None,
        migration: Migration::NotNeeded,
        api: up(&desired.api_deployment),
        worker: up(&desired.worker_deployment),
        deployments_changed: false,
    };
    let earlier = k8s_openapi::jiff::Timestamp::from_second(1_600_000_000).expect("timestamp");
    app.status = Some(status::compute(None, &observed, earlier));
    assert_eq!(
        status::find(app.status.as_ref(), "Ready").map(|c| c.status.as_str()),
        Some("True")
    );

    let script = vec![
        Expect::get(
            p.deployment(&p.api()),
            Reply::Object(live(&desired.api_deployment)),
        ),
        Expect::get(
            p.deployment(&p.worker()),
            Reply::Object(live(&desired.worker_deployment)),
        ),
        Expect::get(p.sa(), Reply::Object(live(&desired.service_account))),
        Expect::get(p.cm(), Reply::Object(live(&desired.config_map))),
        Expect::get(p.svc(), Reply::Object(live(&desired.service))),
        Expect::get(p.pdb(&p.api()), Reply::Object(live(&desired.api_pdb))),
        Expect::get(p.pdb(&p.worker()), Reply::Object(live(&desired.worker_pdb))),
        Expect::get(p.hpa(&p.api()), Reply::NotFound),
        Expect::get(p.hpa(&p.worker()), Reply::NotFound),
    ];
    let (result, _) = reconcile_with(app, script).await;
    assert!(result.is_ok(), "{result:?}");
}

#[tokio::test]
async fn quantities_the_server_rewrote_are_not_reapplied_and_the_app_becomes_ready() {
    // Without this, `cpu: "0.5"` (stored as `500m`) re-applied both Deployments every pass
    // and Ready stayed False with reason RollingOut forever.
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    let mut app = app_from_example(MINIMAL, "demo-ns");
    let requests = app.spec.api.resources.requests.get_or_insert_default();
    requests.insert("cpu".into(), Quantity("0.5".into()));
    requests.insert("memory".into(), Quantity("1.5Gi".into()));
    let p = Paths::of(&app);
    let desired = builders::build(&app, &Inputs::offline(&app)).expect("builds");
    // As the API server stores it: canonical quantities, same applied-hash annotation.
    let mut stored = live(&desired.api_deployment);
    let res = &mut stored["spec"]["template"]["spec"]["containers"][0]["resources"];
    res["requests"]["cpu"] = json!("500m");
    res["requests"]["memory"] = json!("1536Mi");
    let script = vec![
        Expect::get(p.deployment(&p.api()), Reply::Object(stored)),
        Expect::get(
            p.deployment(&p.worker()),
            Reply::Object(live(&desired.worker_deployment)),
        ),
        Expect::get(p.sa(), Reply::Object(live(&desired.service_account))),
        Expect::get(p.cm(), Reply::Object(live(&desired.config_map))),
        Expect::get(p.svc(), Reply::Object(live(&desired.service))),
        Expect::get(p.pdb(&p.api()), Reply::Object(live(&desired.api_pdb))),
        Expect::get(p.pdb(&p.worker()), Reply::Object(live(&desired.worker_pdb))),
        Expect::get(p.hpa(&p.api()), Reply::NotFound),
        Expect::get(p.hpa(&p.worker()), Reply::NotFound),
        // No Deployment PATCH and no `Applied` event.
        Expect::apply(p.status(), |b| {
            assert_eq!(condition(b, "Ready")["status"], "True");
            assert_eq!(condition(b, "Progressing")["reason"], "Reconciled");
        }),
        Expect::event("demo-ns", |b| assert_eq!(b["reason"], "Ready")),
    ];
    let (result, _) = reconcile_with(app, script).await;
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
    let desired = builders::build(&app, &Inputs::offline(&app)).expect("builds");
    let mut edited = live(&desired.config_map);
    edited["data"]["LOG_LEVEL"] = json!("trace");
    let script = vec![
        Expect::get(
            p.deployment(&p.api()),
            Reply::Object(live(&desired.api_deployment)),
        ),
        Expect::get(
            p.deployment(&p.worker()),
            Reply::Object(live(&desired.worker_deployment)),
        ),
        Expect::get(p.sa(), Reply::Object(live(&desired.service_account))),
        Expect::get(p.cm(), Reply::Object(edited)),
        Expect::apply(p.cm(), |b| assert_eq!(b["data"]["LOG_LEVEL"], "info")),
        Expect::get(p.svc(), Reply::Object(live(&desired.service))),
        Expect::get(p.pdb(&p.api()), Reply::Object(live(&desired.api_pdb))),
        Expect::get(p.pdb(&p.worker()), Reply::Object(live(&desired.worker_pdb))),
        Expect::get(p.hpa(&p.api()), Reply::NotFound),
        Expect::get(p.hpa(&p.worker()), Reply::NotFound),
        Expect::event("demo-ns", |b| {
            assert!(
                b["note"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("ConfigMap/demo-config")
            )
        }),
        Expect::apply(p.status(), |b| {
            assert_eq!(condition(b, "Ready")["status"], "True")
        }),
        Expect::event("demo-ns", |b| assert_eq!(b["reason"], "Ready")),
    ];
    let (result, _) = reconcile_with(app, script).await;
    assert!(result.is_ok(), "{result:?}");
}

#[tokio::test]
async fn missing_secret_degrades_names_it_and_warns_without_touching_children() {
    // The API keys Secret is the one most likely to be forgotten when moving to
    // production; without it the new pods would crash-loop on VM_API_KEYS.
    let app = app_from_example(PRODUCTION, "vm-prod");
    let p = Paths::of(&app);
    let [_keys, db, owner, llm, redis, hooks] = prod_secrets("vm-prod");
    let script = vec![
        Expect::get(p.secret("vm-api-keys"), Reply::NotFound),
        Expect::get(p.secret(db.0), Reply::Object(db.1)),
        Expect::get(p.secret(owner.0), Reply::Object(owner.1)),
        Expect::get(p.secret(llm.0), Reply::Object(llm.1)),
        Expect::get(p.secret(redis.0), Reply::Object(redis.1)),
        Expect::get(p.secret(hooks.0), Reply::Object(hooks.1)),
        Expect::get(p.deployment(&p.api()), Reply::NotFound),
        Expect::get(p.deployment(&p.worker()), Reply::NotFound),
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
            assert!(
                b["note"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("vm-api-keys/keys")
            );
        }),
    ];
    let (result, bodies) = reconcile_with(app, script).await;
    let action = result.expect("a missing secret is not a reconcile error");
    assert_eq!(
        action,
        kube::runtime::controller::Action::requeue(std::time::Duration::from_secs(300)),
        "not retried hot"
    );
    assert_no_secret_values(&bodies);
}

/// Requests up to the migration decision for the production example, with the
/// Deployments currently running `serving`.
fn prod_prefix(app: &VmWebapp, serving: &Desired, p: &Paths) -> Vec<Expect> {
    let mut script: Vec<Expect> = prod_secrets(&p.ns)
        .into_iter()
        .map(|(name, secret)| Expect::get(p.secret(name), Reply::Object(secret)))
        .collect();
    script.extend([
        Expect::get(
            p.deployment(&p.api()),
            Reply::Object(live(&serving.api_deployment)),
        ),
        Expect::get(
            p.deployment(&p.worker()),
            Reply::Object(live(&serving.worker_deployment)),
        ),
        Expect::get(p.sa(), Reply::Object(live(&serving.service_account))),
        Expect::get(p.cm(), Reply::Object(live(&serving.config_map))),
        Expect::get(p.svc(), Reply::Object(live(&serving.service))),
        // The job is named after the spec image.
        Expect::get(p.job(&app.spec.image), Reply::NotFound),
    ]);
    script
}

fn prod_suffix(serving: &Desired, p: &Paths) -> Vec<Expect> {
    let hpa = |h: &Option<k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler>| {
        Reply::Object(live(h.as_ref().expect("production example autoscales")))
    };
    vec![
        Expect::get(p.pdb(&p.api()), Reply::Object(live(&serving.api_pdb))),
        Expect::get(p.pdb(&p.worker()), Reply::Object(live(&serving.worker_pdb))),
        Expect::get(p.hpa(&p.api()), hpa(&serving.api_hpa)),
        Expect::get(p.hpa(&p.worker()), hpa(&serving.worker_hpa)),
    ]
}

fn upgrading_app() -> VmWebapp {
    let mut app = app_from_example(PRODUCTION, "vm-prod");
    app.spec.image = "ghcr.io/vmwebapp/vm-webapp:0.2.0".into();
    app.metadata.generation = Some(2);
    app
}

const OLD: &str = "ghcr.io/vmwebapp/vm-webapp:0.1.0";
const NEW: &str = "ghcr.io/vmwebapp/vm-webapp:0.2.0";

#[tokio::test]
async fn new_image_starts_the_migration_job_and_keeps_deployments_on_the_old_image() {
    let app = upgrading_app();
    let p = Paths::of(&app);
    let old = prod_desired(&app, OLD);
    let mut script = prod_prefix(&app, &old, &p);
    script.pop();
    script.push(Expect::get(p.job(NEW), Reply::NotFound));
    script.push(Expect::apply(p.job(NEW), |b| {
        let c = &b["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["image"], NEW);
        assert_eq!(c["args"], json!(["migrate"]));
        assert_eq!(
            b["metadata"]["annotations"]["webapp.vm.dev/generation"],
            "2"
        );
    }));
    // No Deployment PATCH: they stay on the old image while the Job runs.
    script.extend(prod_suffix(&old, &p));
    script.push(Expect::event("vm-prod", |b| {
        assert!(
            b["note"]
                .as_str()
                .unwrap_or_default()
                .contains("Job/vm-migrate-")
        )
    }));
    script.push(Expect::apply(p.status(), |b| {
        assert_eq!(condition(b, "Progressing")["reason"], "MigrationRunning");
        assert_eq!(b["status"]["servingImage"], OLD);
    }));
    script.push(Expect::event("vm-prod", |b| {
        assert_eq!(b["reason"], "MigrationStarted")
    }));
    let (result, bodies) = reconcile_with(app, script).await;
    assert!(result.is_ok(), "{result:?}");
    assert_no_secret_values(&bodies);
}

#[tokio::test]
async fn succeeded_migration_moves_both_deployments_to_the_new_image() {
    let app = upgrading_app();
    let p = Paths::of(&app);
    let old = prod_desired(&app, OLD);
    let new = prod_desired(&app, NEW);
    let mut job = live(new.migration_job.as_ref().expect("job"));
    job["status"] = json!({"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]});
    let mut script = prod_prefix(&app, &old, &p);
    script.pop();
    script.push(Expect::get(p.job(NEW), Reply::Object(job.clone())));
    // Created without a TTL (a failed Job must stay); a succeeded one is kept for a day.
    script.push(Expect::merge_patch(
        p.job(NEW),
        |b| assert_eq!(b, &json!({"spec": {"ttlSecondsAfterFinished": 86400}})),
        job,
    ));
    script.push(Expect::apply(p.deployment(&p.api()), |b| {
        assert_eq!(container(b)["image"], NEW);
        assert!(b["spec"].get("replicas").is_none(), "the HPA owns replicas");
    }));
    script.push(Expect::apply(p.deployment(&p.worker()), |b| {
        assert_eq!(container(b)["image"], NEW)
    }));
    script.extend(prod_suffix(&new, &p));
    script.push(Expect::event("vm-prod", |b| {
        assert_eq!(b["reason"], "Applied")
    }));
    script.push(Expect::apply(p.status(), |b| {
        assert_eq!(condition(b, "Progressing")["reason"], "RollingOut");
        assert_eq!(condition(b, "Degraded")["status"], "False");
    }));
    let (result, bodies) = reconcile_with(app, script).await;
    assert!(result.is_ok(), "{result:?}");
    assert_no_secret_values(&bodies);
}

#[tokio::test]
async fn failed_migration_keeps_the_old_image_and_reports_migration_failed() {
    let app = upgrading_app();
    let p = Paths::of(&app);
    let old = prod_desired(&app, OLD);
    let new = prod_desired(&app, NEW);
    let mut job = live(new.migration_job.as_ref().expect("job"));
    job["status"] = json!({"failed": 3, "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]});
    let mut script = prod_prefix(&app, &old, &p);
    script.pop();
    script.push(Expect::get(p.job(NEW), Reply::Object(job)));
    script.extend(prod_suffix(&old, &p));
    script.push(Expect::apply(p.status(), |b| {
        let d = condition(b, "Degraded");
        assert_eq!(
            (d["status"].as_str(), d["reason"].as_str()),
            (Some("True"), Some("MigrationFailed"))
        );
        assert_eq!(b["status"]["servingImage"], OLD);
        assert_eq!(condition(b, "Ready")["status"], "False");
    }));
    script.push(Expect::event("vm-prod", |b| {
        assert_eq!(
            (b["type"].as_str(), b["reason"].as_str()),
            (Some("Warning"), Some("MigrationFailed"))
        );
    }));
    let (result, _) = reconcile_with(app, script).await;
    assert!(result.is_ok(), "{result:?}");
}

#[tokio::test]
async fn failed_migration_is_retried_after_the_next_spec_change() {
    let mut app = upgrading_app();
    app.metadata.generation = Some(3);
    let p = Paths::of(&app);
    let old = prod_desired(&app, OLD);
    let new = prod_desired(&app, NEW);
    // The failed Job was created for generation 2.
    let mut job = live(new.migration_job.as_ref().expect("job"));
    job["metadata"]["annotations"]["webapp.vm.dev/generation"] = json!("2");
    job["status"] = json!({"failed": 3, "conditions": [{"type": "Failed", "status": "True"}]});
    let mut script = prod_prefix(&app, &old, &p);
    script.pop();
    script.push(Expect::get(p.job(NEW), Reply::Object(job)));
    script.push(Expect::delete(p.job(NEW)));
    script.extend(prod_suffix(&old, &p));
    script.push(Expect::event("vm-prod", |b| {
        assert!(
            b["note"]
                .as_str()
                .unwrap_or_default()
                .contains("deleted failed Job")
        )
    }));
    script.push(Expect::apply(p.status(), |b| {
        assert_eq!(condition(b, "Progressing")["reason"], "MigrationRunning")
    }));
    script.push(Expect::event("vm-prod", |b| {
        assert_eq!(b["reason"], "MigrationStarted")
    }));
    let (result, _) = reconcile_with(app, script).await;
    assert!(result.is_ok(), "{result:?}");
}

#[tokio::test]
async fn suspended_resource_only_reports_status() {
    let mut app = app_from_example(MINIMAL, "demo-ns");
    app.spec.suspend = true;
    let p = Paths::of(&app);
    let script = vec![
        Expect::get(p.deployment(&p.api()), Reply::NotFound),
        Expect::get(p.deployment(&p.worker()), Reply::NotFound),
        Expect::apply(p.status(), |b| {
            assert_eq!(condition(b, "Progressing")["reason"], "Suspended")
        }),
    ];
    let (result, _) = reconcile_with(app, script).await;
    assert!(result.is_ok(), "{result:?}");
}

#[tokio::test]
async fn an_unexpected_request_fails_the_reconcile() {
    // Guards the harness itself: a pass that makes more requests than scripted must fail.
    let app = app_from_example(MINIMAL, "demo-ns");
    let p = Paths::of(&app);
    let script = vec![Expect::get(p.deployment(&p.api()), Reply::NotFound)];
    let (result, _) = reconcile_with(app, script).await;
    assert!(result.is_err());
}

#[test]
fn backoff_grows_per_object_and_caps_at_five_minutes() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let _guard = rt.enter();
    let (ctx, _handle) = crate::fixtures::test_context();
    let delays: Vec<u64> = (0..8).map(|_| ctx.backoff("ns/a").as_secs()).collect();
    assert_eq!(delays, [5, 10, 20, 40, 80, 160, 300, 300]);
    assert_eq!(
        ctx.backoff("ns/b").as_secs(),
        5,
        "another object has its own count"
    );
}

/// Steady-state requests of the minimal example, with `api_hpa` as the live API HPA.
fn minimal_with_live_hpa(app: &VmWebapp, api_hpa: Value, delete: bool) -> Vec<Expect> {
    let p = Paths::of(app);
    let desired = builders::build(app, &Inputs::offline(app)).expect("builds");
    let mut script = vec![
        Expect::get(
            p.deployment(&p.api()),
            Reply::Object(live(&desired.api_deployment)),
        ),
        Expect::get(
            p.deployment(&p.worker()),
            Reply::Object(live(&desired.worker_deployment)),
        ),
        Expect::get(p.sa(), Reply::Object(live(&desired.service_account))),
        Expect::get(p.cm(), Reply::Object(live(&desired.config_map))),
        Expect::get(p.svc(), Reply::Object(live(&desired.service))),
        Expect::get(p.pdb(&p.api()), Reply::Object(live(&desired.api_pdb))),
        Expect::get(p.pdb(&p.worker()), Reply::Object(live(&desired.worker_pdb))),
        Expect::get(p.hpa(&p.api()), Reply::Object(api_hpa)),
    ];
    if delete {
        script.push(Expect::delete(p.hpa(&p.api())));
    }
    script.push(Expect::get(p.hpa(&p.worker()), Reply::NotFound));
    if delete {
        script.push(Expect::event("demo-ns", |b| {
            assert!(
                b["note"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("deleted HorizontalPodAutoscaler/demo-api")
            )
        }));
    }
    script.push(Expect::apply(p.status(), |b| {
        assert_eq!(condition(b, "Ready")["status"], "True")
    }));
    script.push(Expect::event("demo-ns", |b| {
        assert_eq!(b["reason"], "Ready")
    }));
    script
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
    let script = minimal_with_live_hpa(&app, api_hpa_of(&app), true);
    let (result, _) = reconcile_with(app, script).await;
    assert!(result.is_ok(), "{result:?}");
}

#[tokio::test]
async fn an_hpa_someone_else_owns_is_left_alone() {
    let app = app_from_example(MINIMAL, "demo-ns");
    let mut foreign = api_hpa_of(&app);
    foreign["metadata"]["ownerReferences"][0]["uid"] = json!("someone-else");
    let script = minimal_with_live_hpa(&app, foreign, false);
    let (result, _) = reconcile_with(app, script).await;
    assert!(result.is_ok(), "{result:?}");
}

#[tokio::test]
async fn turning_autoscaling_on_hands_replicas_over_before_dropping_them() {
    // Without this the first apply without `replicas` removed the field the operator owned
    // and the Deployment fell back to 1 replica until the HPA scaled it up again.
    let mut before = app_from_example(MINIMAL, "demo-ns");
    before.spec.api.replicas = 3;
    let was = builders::build(&before, &Inputs::offline(&before)).expect("builds");
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
    let desired = builders::build(&app, &Inputs::offline(&app)).expect("builds");
    let script = vec![
        Expect::get(p.deployment(&p.api()), Reply::Object(live_api)),
        Expect::get(
            p.deployment(&p.worker()),
            Reply::Object(live(&desired.worker_deployment)),
        ),
        Expect::get(p.sa(), Reply::Object(live(&desired.service_account))),
        Expect::get(p.cm(), Reply::Object(live(&desired.config_map))),
        Expect::get(p.svc(), Reply::Object(live(&desired.service))),
        // 1. The live count, claimed by a second manager, so it survives step 2.
        Expect::apply_as(
            p.deployment(&p.api()),
            "vm-operator-replicas-handover",
            |b| {
                assert_eq!(b["spec"], json!({"replicas": 3}));
                assert_eq!(b["metadata"], json!({"name": "demo-api"}));
            },
        ),
        // 2. The operator's own apply no longer sets replicas.
        Expect::apply(p.deployment(&p.api()), |b| {
            assert!(b["spec"].get("replicas").is_none(), "{b}");
        }),
        Expect::get(p.pdb(&p.api()), Reply::Object(live(&desired.api_pdb))),
        Expect::get(p.pdb(&p.worker()), Reply::Object(live(&desired.worker_pdb))),
        Expect::get(p.hpa(&p.api()), Reply::NotFound),
        Expect::apply(p.hpa(&p.api()), |b| assert_eq!(b["spec"]["minReplicas"], 2)),
        Expect::get(p.hpa(&p.worker()), Reply::NotFound),
        Expect::event("demo-ns", |b| {
            assert!(
                b["note"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("replicas handed to the HPA")
            )
        }),
        Expect::apply(p.status(), |_| {}),
    ];
    let (result, _) = reconcile_with(app, script).await;
    assert!(result.is_ok(), "{result:?}");
}
