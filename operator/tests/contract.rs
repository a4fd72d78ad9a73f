//! The app/operator contract: what the operator renders is what the app accepts.
//!
//! For every example and for specs at the CRD's bounds, the env (ConfigMap data plus
//! `secretKeyRef`s resolved to sample values), the command line, the ports and the probe
//! paths of each rendered container are fed to the app's own settings parser
//! (`Settings::from_lookup`), its own CLI (`Cli::try_parse_from`) and its own routers
//! (`router`, `health_router`). A change on either side that breaks the other fails here.
//! Beyond "the app accepts it", the parsed settings must be the ones the spec asked for
//! (API keys, webhook secrets, rate limits, CORS, shutdown timing, migration role), each on
//! the workload that uses it, and each pod's termination grace period must cover the
//! shutdown sequence the app will actually run with those settings.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

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

/// API keys in the sample `vm-api-keys` Secret (`id:key[:roles][:tenant=NAME]`).
const SAMPLE_API_KEYS: &str = "ops:sample-key-0123456789abcdef:admin,ci:sample-key-fedcba9876543210,reviewer:sample-key-00112233445566778899:approver:tenant=acme";
/// Webhook secrets in the sample `vm-webhooks` Secret (`source:secret`), one source
/// mid-rotation.
const SAMPLE_WEBHOOK_SECRETS: &str = "github:sample-webhook-0123456789abcdef,github:sample-webhook-fedcba9876543210,billing:sample-webhook-00112233445566778899";

/// Sample values for every Secret key the examples reference.
fn sample_secrets() -> BTreeMap<(String, String), String> {
    [
        (("vm-db", "url"), "postgres://vm:sample@db:5432/vm"),
        (
            ("vm-db-owner", "url"),
            "postgres://vm_owner:sample@db:5432/vm",
        ),
        (("vm-redis", "url"), "redis://redis:6379/0"),
        (("vm-llm", "api-key"), "sk-sample"),
        (("vm-api-keys", "keys"), SAMPLE_API_KEYS),
        (("vm-webhooks", "secrets"), SAMPLE_WEBHOOK_SECRETS),
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
    if let Some(cron) = &d.backup_cron_job {
        let job = &cron.spec.as_ref().expect("spec").job_template;
        out.push((
            "backup",
            spec(&job.spec.as_ref().expect("job spec").template),
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
        // The plans file is the ConfigMap's content, mounted: here, the example it is made
        // from.
        let plans = format!("{}/../examples/plans.yaml", env!("CARGO_MANIFEST_DIR"));
        let settings = Settings::from_lookup(|k| match k {
            "VM_PLANS_FILE" if env.contains_key(k) => Some(plans.clone()),
            _ => env.get(k).cloned(),
        })
        .unwrap_or_else(|e| panic!("{role}: the app rejects the rendered environment: {e}"));
        assert_eq!(i32::from(settings.port), app.spec.api.port, "{role}: PORT");
        assert_security(app, role, &settings);
        assert_grace_covers_shutdown(role, pod, &settings);
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
            (Command::Backup(args), "backup") => {
                let backup = app.spec.backup.as_ref().expect("spec.backup");
                assert_eq!(args.keep, Some(backup.retention as u32), "backup --keep");
                let dir = args.output_dir.as_ref().expect("backup --output-dir");
                let claim = pod
                    .volumes
                    .iter()
                    .flatten()
                    .find(|v| {
                        v.persistent_volume_claim
                            .as_ref()
                            .is_some_and(|p| p.claim_name == backup.claim_name)
                    })
                    .expect("the claim is a volume");
                assert!(
                    c.volume_mounts
                        .iter()
                        .flatten()
                        .any(|m| m.name == claim.name
                            && std::path::Path::new(&m.mount_path) == dir.as_path()),
                    "backup --output-dir is the claim's mount"
                );
                None
            }
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

/// Number of comma-separated entries of a sample Secret value.
fn entries(value: &str) -> usize {
    value.split(',').filter(|e| !e.trim().is_empty()).count()
}

/// The security settings the app parsed are the ones the spec asked for, on the workload
/// that uses them, and absent from the others.
fn assert_security(app: &VmWebapp, role: &str, settings: &Settings) {
    let spec = &app.spec;
    let sec = &settings.security;
    let expected_keys = if spec.auth.api_keys.is_some() {
        entries(SAMPLE_API_KEYS)
    } else {
        0
    };
    assert_eq!(sec.api_keys.len(), expected_keys, "{role}: API keys");
    let millis = |d: Duration| i64::try_from(d.as_millis()).expect("fits");
    if role == "api" {
        let expected_hooks = if spec.webhooks.secrets.is_some() {
            entries(SAMPLE_WEBHOOK_SECRETS)
        } else {
            0
        };
        assert_eq!(sec.webhook_secrets.len(), expected_hooks, "webhook secrets");
        if let Some(t) = spec.webhooks.tolerance_seconds {
            assert_eq!(sec.webhook_tolerance, Duration::from_secs(t as u64));
        }
        assert_eq!(
            sec.webhook_allowed.len(),
            spec.webhooks.allowed_cidrs.len(),
            "webhook allowed CIDRs"
        );
        assert_eq!(
            sec.trusted_proxy_header,
            spec.api
                .trusted_proxy_header
                .as_ref()
                .map(|h| h.to_ascii_lowercase()),
            "trusted proxy header"
        );
        if let Some(r) = &spec.api.rate_limit {
            let pairs = [
                (r.per_key_rps, sec.rate_per_key.per_second, "per-key rps"),
                (r.per_ip_rps, sec.rate_per_ip.per_second, "per-ip rps"),
                (
                    r.per_key_burst,
                    f64::from(sec.rate_per_key.burst),
                    "per-key burst",
                ),
                (
                    r.per_ip_burst,
                    f64::from(sec.rate_per_ip.burst),
                    "per-ip burst",
                ),
            ];
            for (asked, got, what) in pairs {
                if let Some(asked) = asked {
                    assert_eq!(f64::from(asked), got, "rate limit {what}");
                }
            }
        }
        assert_eq!(
            sec.cors_origins.len(),
            spec.api.cors_allowed_origins.len(),
            "CORS origins"
        );
        if let Some(t) = spec.api.request_timeout_ms {
            assert_eq!(millis(sec.request_timeout), i64::from(t), "request timeout");
        }
        assert_eq!(
            millis(settings.shutdown_delay),
            i64::from(spec.api.shutdown_delay_ms),
            "shutdown delay"
        );
    } else {
        assert!(
            sec.webhook_secrets.is_empty(),
            "{role}: webhook secrets reach only the API"
        );
        assert!(
            sec.cors_origins.is_empty() && sec.trusted_proxy_header.is_none(),
            "{role}: HTTP settings reach only the API"
        );
    }
    if role == "migration" || role == "backup" {
        assert_eq!(
            sec.migration_db_url.is_some(),
            spec.migrations.database.is_some(),
            "{role}: migration database URL"
        );
        let role_expected = if role == "migration" {
            spec.migrations.runtime_role.clone()
        } else {
            None
        };
        assert_eq!(sec.runtime_db_role, role_expected, "{role}: runtime role");
    } else {
        assert!(
            sec.migration_db_url.is_none() && sec.runtime_db_role.is_none(),
            "{role}: the schema owner's URL and the runtime role reach only the migration Job"
        );
    }
}

/// The kubelet waits `terminationGracePeriodSeconds` before SIGKILL; the app's shutdown
/// (delay, then draining requests or jobs) must fit inside it.
fn assert_grace_covers_shutdown(role: &str, pod: &PodSpec, settings: &Settings) {
    let grace = Duration::from_secs(
        pod.termination_grace_period_seconds
            .and_then(|g| u64::try_from(g).ok())
            .expect("grace period"),
    );
    let drain = match role {
        // Streams end at SIGTERM; the last write to a client that stopped reading waits
        // up to the stream write timeout.
        "api" => settings
            .security
            .request_timeout
            .max(settings.queue.shutdown_grace)
            .max(settings.stream.write_timeout),
        "worker" => settings.queue.shutdown_grace,
        _ => Duration::ZERO,
    };
    let needed = settings.shutdown_delay + drain;
    assert!(
        grace > needed,
        "{role}: terminationGracePeriodSeconds {grace:?} does not cover the shutdown delay plus the drain ({needed:?})"
    );
}

#[tokio::test]
async fn minimal_example_renders_what_the_app_accepts_and_serves() {
    assert_contract(&example("minimal.yaml")).await;
}

#[tokio::test]
async fn backup_example_renders_a_cron_job_the_app_accepts() {
    let app = example("backup.yaml");
    assert!(render(&app).backup_cron_job.is_some());
    assert_contract(&app).await;
}

#[tokio::test]
async fn tenants_example_mounts_the_plans_file_the_app_accepts() {
    // The plans reach the app as a file: the container must name the mounted key, and the
    // app must accept the example plans file the ConfigMap is created from.
    let app = example("tenants.yaml");
    let d = render(&app);
    for (role, pod) in pods(&d) {
        let c = &pod.containers[0];
        let named = environment(&d, c).get("VM_PLANS_FILE").cloned();
        if role == "api" || role == "worker" {
            let mount = c
                .volume_mounts
                .iter()
                .flatten()
                .find(|m| m.name == "plans")
                .unwrap_or_else(|| panic!("{role}: the plans are mounted"));
            let file = named.unwrap_or_else(|| panic!("{role}: VM_PLANS_FILE is set"));
            assert!(
                file.starts_with(&format!("{}/", mount.mount_path)),
                "{role}: VM_PLANS_FILE {file} is not under the plans mount"
            );
        } else {
            assert_eq!(named, None, "{role}: reads no plans");
        }
    }
    assert_contract(&app).await;
}

#[tokio::test]
async fn production_example_renders_what_the_app_accepts_and_serves() {
    assert_contract(&example("production.yaml")).await;
}

/// `minimum` and `maximum` of the spec field at `path` (for example `["api", "port"]`) in
/// the CRD schema.
fn bounds(path: &[&str]) -> (i64, i64) {
    let crd = serde_json::to_value(VmWebapp::crd()).expect("crd");
    let mut f = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    for p in path {
        f = &f["properties"][p];
    }
    let n = |k: &str| {
        f[k].as_f64()
            .map(|v| v as i64)
            .unwrap_or_else(|| panic!("spec.{} has a {k}", path.join(".")))
    };
    (n("minimum"), n("maximum"))
}

#[tokio::test]
async fn every_value_the_crd_admits_renders_a_command_line_the_app_accepts() {
    // Without this, the CRD could admit (say) a poll interval the app's CLI refuses, and pods
    // would crash-loop on a spec the API server accepted.
    let (poll_min, poll_max) = bounds(&["worker", "pollIntervalMs"]);
    let (conc_min, conc_max) = bounds(&["worker", "concurrency"]);
    let (health_min, health_max) = bounds(&["worker", "healthPort"]);
    let (port_min, port_max) = bounds(&["api", "port"]);
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

#[tokio::test]
async fn every_security_and_shutdown_value_the_crd_admits_is_accepted_by_the_app() {
    // Without this, the CRD could admit (say) a rate limit or a shutdown delay the app's
    // settings parser refuses, and API pods would crash-loop on an accepted spec.
    let i32_of = |v: i64| i32::try_from(v).expect("i32");
    let (delay_min, delay_max) = bounds(&["api", "shutdownDelayMs"]);
    let (timeout_min, timeout_max) = bounds(&["api", "requestTimeoutMs"]);
    let (tol_min, tol_max) = bounds(&["webhooks", "toleranceSeconds"]);
    let (rps_min, rps_max) = bounds(&["api", "rateLimit", "perKeyRps"]);
    let (burst_min, burst_max) = bounds(&["api", "rateLimit", "perKeyBurst"]);
    let (ip_rps_min, ip_rps_max) = bounds(&["api", "rateLimit", "perIpRps"]);
    let (ip_burst_min, ip_burst_max) = bounds(&["api", "rateLimit", "perIpBurst"]);
    let low = (
        delay_min,
        timeout_min,
        tol_min,
        [rps_min, burst_min, ip_rps_min, ip_burst_min],
    );
    let high = (
        delay_max,
        timeout_max,
        tol_max,
        [rps_max, burst_max, ip_rps_max, ip_burst_max],
    );
    for (delay, timeout, tolerance, [rps, burst, ip_rps, ip_burst]) in [low, high] {
        let mut app = example("production.yaml");
        app.spec.api.shutdown_delay_ms = i32_of(delay);
        app.spec.api.request_timeout_ms = Some(i32_of(timeout));
        app.spec.webhooks.tolerance_seconds = Some(i32_of(tolerance));
        app.spec.api.rate_limit = Some(vm_operator::crd::RateLimitSpec {
            per_key_rps: Some(i32_of(rps)),
            per_key_burst: Some(i32_of(burst)),
            per_ip_rps: Some(i32_of(ip_rps)),
            per_ip_burst: Some(i32_of(ip_burst)),
        });
        assert_contract(&app).await;
    }
}

#[tokio::test]
async fn the_app_refuses_production_without_the_api_keys_the_crd_requires() {
    // The CRD rule "appEnv production requires spec.auth.apiKeys" exists because of this
    // app behaviour; if the app stopped requiring keys (or the operator stopped rendering
    // them) this pins which side moved.
    let mut app = example("production.yaml");
    app.spec.auth.api_keys = None;
    let d = render(&app);
    let api = &pods(&d)[0];
    assert_eq!(api.0, "api");
    let env = environment(&d, &api.1.containers[0]);
    assert!(!env.contains_key("VM_API_KEYS"));
    let errors = Settings::from_lookup(|k| env.get(k).cloned())
        .expect_err("production without API keys is refused");
    assert!(
        errors.0.iter().any(|e| e.variable == "VM_API_KEYS"),
        "{errors:?}"
    );
}

/// Issue kind: a readiness check whose budget equals the probe timeout makes the kubelet
/// record a timeout and never the 503 with its reason. The app's check budget must stay at
/// most half of the `timeoutSeconds` the operator renders on every readiness probe, and the
/// operator's documented budget must be the app's.
#[test]
fn readiness_check_budget_is_clearly_inside_the_rendered_probe_timeout() {
    let budget = vm_webapp::http::health::READY_CHECK_BUDGET;
    assert_eq!(
        i64::try_from(budget.as_millis()).expect("small"),
        vm_operator::consts::app::READY_CHECK_BUDGET_MS,
        "the operator's constant names the app's readiness budget"
    );
    for name in ["minimal.yaml", "production.yaml", "backup.yaml"] {
        let d = render(&example(name));
        let mut probed = 0;
        for (role, pod) in pods(&d) {
            for c in &pod.containers {
                let Some(probe) = &c.readiness_probe else {
                    continue;
                };
                probed += 1;
                let timeout = Duration::from_secs(
                    u64::try_from(probe.timeout_seconds.unwrap_or(1)).expect("positive"),
                );
                assert!(
                    budget * 2 <= timeout,
                    "{name} {role}: readiness budget {budget:?} is not clearly inside timeoutSeconds {timeout:?}"
                );
            }
        }
        assert_eq!(
            probed, 2,
            "{name}: the API and the worker have readiness probes"
        );
    }
}
