//! The app/operator contract: what the operator renders is what the app accepts.
//!
//! For every example and for specs at the CRD's bounds, the env (ConfigMap data plus
//! `secretKeyRef`s resolved to sample values), the command line, the ports and the probe
//! paths of each rendered container are fed to the app's own settings parser
//! (`Settings::from_lookup`), its own CLI (`Cli::try_parse_from`) and its own routers
//! (`router`, `health_router`). A change on either side that breaks the other fails here.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Body;
use clap::Parser;
use http::{Request, StatusCode};
use k8s_openapi::api::core::v1::{Container, PodSpec};
use kube::CustomResourceExt;
use tower::ServiceExt;
use vm_operator::builders::{self, Desired, Inputs};
use vm_operator::crd::VmWebapp;
use vm_webapp::cli::{Cli, Command};
use vm_webapp::config::Settings;

/// Sample values for every Secret key the examples reference.
fn sample_secrets() -> BTreeMap<(String, String), String> {
    [
        (("vm-db", "url"), "postgres://vm:sample@db:5432/vm"),
        (("vm-redis", "url"), "redis://redis:6379/0"),
        (("vm-llm", "api-key"), "sk-sample"),
    ]
    .into_iter()
    .map(|((n, k), v)| ((n.to_owned(), k.to_owned()), v.to_owned()))
    .collect()
}

fn example(name: &str) -> VmWebapp {
    let path = format!("{}/../examples/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(path).expect("example exists");
    let mut app: VmWebapp = serde_yaml::from_str(&text).expect("example parses");
    app.metadata
        .namespace
        .get_or_insert_with(|| "default".into());
    app.metadata.uid = Some("contract".into());
    app
}

fn render(app: &VmWebapp) -> Desired {
    let secrets = sample_secrets();
    let mut inputs = Inputs::offline(app);
    for (key, value) in inputs.secret_data.iter_mut() {
        *value = Some(
            secrets
                .get(key)
                .unwrap_or_else(|| panic!("no sample value for secret {key:?}"))
                .clone()
                .into_bytes(),
        );
    }
    builders::build(app, &inputs).expect("renders")
}

/// Every rendered pod with the name of the router that serves its probes.
fn pods(d: &Desired) -> Vec<(&'static str, &PodSpec)> {
    fn spec(t: &k8s_openapi::api::core::v1::PodTemplateSpec) -> &PodSpec {
        t.spec.as_ref().expect("pod spec")
    }
    let mut out = vec![
        (
            "api",
            spec(&d.api_deployment.spec.as_ref().expect("spec").template),
        ),
        (
            "worker",
            spec(&d.worker_deployment.spec.as_ref().expect("spec").template),
        ),
    ];
    if let Some(job) = &d.migration_job {
        out.push((
            "migration",
            spec(&job.spec.as_ref().expect("spec").template),
        ));
    }
    out
}

/// The environment a container sees: its ConfigMap via envFrom, then its env entries.
fn environment(d: &Desired, c: &Container) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for from in c.env_from.iter().flatten() {
        let cm = from
            .config_map_ref
            .as_ref()
            .expect("only ConfigMap envFrom");
        assert_eq!(
            Some(&cm.name),
            d.config_map.metadata.name.as_ref(),
            "envFrom names the rendered ConfigMap"
        );
        env.extend(d.config_map.data.clone().unwrap_or_default());
    }
    let secrets = sample_secrets();
    for e in c.env.iter().flatten() {
        let value = match (
            &e.value,
            e.value_from
                .as_ref()
                .and_then(|v| v.secret_key_ref.as_ref()),
        ) {
            (Some(v), None) => v.clone(),
            (None, Some(r)) => secrets
                .get(&(r.name.clone(), r.key.clone()))
                .expect("sample secret")
                .clone(),
            other => panic!(
                "env {} is neither a value nor a secretKeyRef: {other:?}",
                e.name
            ),
        };
        env.insert(e.name.clone(), value);
    }
    env
}

fn port(c: &Container, name: &str) -> Option<u16> {
    c.ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some(name))
        .and_then(|p| u16::try_from(p.container_port).ok())
}

fn probe_paths(c: &Container) -> Vec<String> {
    [&c.liveness_probe, &c.readiness_probe, &c.startup_probe]
        .into_iter()
        .flatten()
        .filter_map(|p| p.http_get.as_ref())
        .filter_map(|h| h.path.clone())
        .collect()
}

/// An app state on a throwaway SQLite database, to ask the app's routers about paths.
async fn app_state(dir: &tempfile::TempDir) -> vm_webapp::http::AppState {
    let url = format!("sqlite://{}/contract.db?mode=rwc", dir.path().display());
    let root = dir.path().display().to_string();
    let env: BTreeMap<&str, &str> = [
        ("APP_ENV", "local"),
        ("VM_DB_URL", url.as_str()),
        ("VM_WORKSPACE_ROOT", root.as_str()),
    ]
    .into();
    let settings = Arc::new(
        Settings::from_lookup(|k| env.get(k).map(|v| (*v).to_owned())).expect("local settings"),
    );
    let store = vm_webapp::store::Store::connect(&settings.database, 2)
        .await
        .expect("sqlite connects");
    store.migrate().await.expect("migrates");
    vm_webapp::http::AppState::new(store, settings)
}

async fn assert_contract(app: &VmWebapp) {
    let d = render(app);
    let dir = tempfile::tempdir().expect("tempdir");
    let state = app_state(&dir).await;
    for (role, pod) in pods(&d) {
        let c = &pod.containers[0];
        let env = environment(&d, c);
        let settings = Settings::from_lookup(|k| env.get(k).cloned())
            .unwrap_or_else(|e| panic!("{role}: the app rejects the rendered environment: {e}"));
        assert_eq!(i32::from(settings.port), app.spec.api.port, "{role}: PORT");
        let mounts: Vec<&str> = c
            .volume_mounts
            .iter()
            .flatten()
            .map(|m| m.mount_path.as_str())
            .collect();
        assert!(
            mounts
                .iter()
                .any(|m| settings.workspace_root.starts_with(m)),
            "{role}: VM_WORKSPACE_ROOT {} is not on a writable mount {mounts:?}",
            settings.workspace_root.display()
        );

        let argv: Vec<String> = c
            .command
            .iter()
            .flatten()
            .chain(c.args.iter().flatten())
            .cloned()
            .collect();
        let cli = Cli::try_parse_from(&argv)
            .unwrap_or_else(|e| panic!("{role}: the app rejects {argv:?}: {e}"));
        let router = match (&cli.command, role) {
            (Command::Serve(args), "api") => {
                assert_eq!(
                    args.host, "0.0.0.0",
                    "the API must listen on all interfaces"
                );
                assert_eq!(
                    args.port,
                    port(c, "http"),
                    "serve --port is the container's http port"
                );
                Some(vm_webapp::http::router(state.clone()))
            }
            (Command::Worker(args), "worker") => {
                assert_eq!(
                    Some(args.health_port),
                    port(c, "health"),
                    "worker --health-port is the container's health port"
                );
                assert_eq!(
                    args.poll_interval_ms,
                    u64::try_from(app.spec.worker.poll_interval_ms).expect("positive")
                );
                assert_eq!(
                    args.concurrency,
                    u64::try_from(app.spec.worker.concurrency).expect("positive")
                );
                Some(vm_webapp::http::health_router(state.clone()))
            }
            (Command::Migrate, "migration") => None,
            (other, _) => panic!("{role}: renders the wrong subcommand {other:?}"),
        };
        let paths = probe_paths(c);
        match router {
            Some(router) => {
                assert!(!paths.is_empty(), "{role}: has probes");
                for path in paths {
                    let response = router
                        .clone()
                        .oneshot(Request::get(&path).body(Body::empty()).expect("request"))
                        .await
                        .expect("router answers");
                    let status = response.status();
                    assert!(
                        status == StatusCode::OK || status == StatusCode::SERVICE_UNAVAILABLE,
                        "{role}: probe path {path} answers {status}"
                    );
                }
            }
            None => assert!(paths.is_empty(), "{role}: a Job has no probes"),
        }
    }
}

#[tokio::test]
async fn minimal_example_renders_what_the_app_accepts_and_serves() {
    assert_contract(&example("minimal.yaml")).await;
}

#[tokio::test]
async fn production_example_renders_what_the_app_accepts_and_serves() {
    assert_contract(&example("production.yaml")).await;
}

/// `minimum` and `maximum` of `spec.<section>.properties.<field>` in the CRD schema.
fn bounds(section: &str, field: &str) -> (i64, i64) {
    let crd = serde_json::to_value(VmWebapp::crd()).expect("crd");
    let f = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
        [section]["properties"][field];
    let n = |k: &str| {
        f[k].as_f64()
            .map(|v| v as i64)
            .unwrap_or_else(|| panic!("{section}.{field} has a {k}"))
    };
    (n("minimum"), n("maximum"))
}

#[tokio::test]
async fn every_value_the_crd_admits_renders_a_command_line_the_app_accepts() {
    // Without this, the CRD could admit (say) a poll interval the app's CLI refuses, and pods
    // would crash-loop on a spec the API server accepted.
    let (poll_min, poll_max) = bounds("worker", "pollIntervalMs");
    let (conc_min, conc_max) = bounds("worker", "concurrency");
    let (health_min, health_max) = bounds("worker", "healthPort");
    let (port_min, port_max) = bounds("api", "port");
    let extremes = [
        (poll_min, conc_min, health_min, port_max),
        (poll_max, conc_max, health_max, port_min),
    ];
    for (poll, concurrency, health, api_port) in extremes {
        let mut app = example("production.yaml");
        app.spec.worker.poll_interval_ms = i32::try_from(poll).expect("i32");
        app.spec.worker.concurrency = i32::try_from(concurrency).expect("i32");
        app.spec.worker.health_port = i32::try_from(health).expect("i32");
        app.spec.api.port = i32::try_from(api_port).expect("i32");
        assert_contract(&app).await;
    }
}
