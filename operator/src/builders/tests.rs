//! Unit tests of the builders.

use super::*;
use crate::crd::{ExtraEnvVar, SecretKeyRef, VmWebappSpec};
use k8s_openapi::api::core::v1::{Container, PodSpec};

fn app(spec: serde_json::Value) -> VmWebapp {
    let mut app: VmWebapp = serde_json::from_value(serde_json::json!({
        "apiVersion": "webapp.vm.dev/v1alpha1",
        "kind": "VmWebapp",
        "metadata": {"name": "shop", "namespace": "prod", "uid": "1234", "generation": 3},
        "spec": spec,
    }))
    .expect("valid VmWebapp");
    app.metadata.uid = Some("1234".into());
    app
}

fn managed() -> VmWebapp {
    app(serde_json::json!({
        "image": "img:2",
        "managedMode": true,
        "database": {"name": "db", "key": "url"},
        "redis": {"name": "redis", "key": "url"},
        "llm": {"apiKey": {"name": "llm", "key": "key"}, "model": "m"},
    }))
}

fn built(app: &VmWebapp) -> Desired {
    build(app, &Inputs::offline(app)).expect("builds")
}

fn pod(d: &Deployment) -> &PodSpec {
    d.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("pod spec")
}

fn container(d: &Deployment) -> &Container {
    &pod(d).containers[0]
}

fn all_pods(d: &Desired) -> Vec<&PodSpec> {
    let mut pods = vec![pod(&d.api_deployment), pod(&d.worker_deployment)];
    if let Some(job) = &d.migration_job {
        pods.push(
            job.spec
                .as_ref()
                .and_then(|s| s.template.spec.as_ref())
                .expect("job pod"),
        );
    }
    pods
}

#[test]
fn api_runs_serve_on_the_spec_port_with_the_contract_probe_paths() {
    let d = built(&managed());
    let c = container(&d.api_deployment);
    let argv: Vec<&str> = c
        .command
        .iter()
        .flatten()
        .chain(c.args.iter().flatten())
        .map(String::as_str)
        .collect();
    assert_eq!(
        argv,
        ["vm-webapp", "serve", "--host", "0.0.0.0", "--port", "8080"]
    );
    let path = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        p.as_ref()
            .and_then(|p| p.http_get.as_ref())
            .and_then(|h| h.path.clone())
    };
    assert_eq!(
        path(&c.liveness_probe).as_deref(),
        Some("/api/v2/health/live")
    );
    assert_eq!(
        path(&c.readiness_probe).as_deref(),
        Some("/api/v2/health/ready")
    );
    assert!(c.startup_probe.is_some());
    assert_eq!(c.ports.as_ref().map(|p| p[0].container_port), Some(8080));
}

#[test]
fn worker_runs_worker_with_probes_on_its_health_port() {
    let d = built(&managed());
    let c = container(&d.worker_deployment);
    assert_eq!(
        c.args.clone().unwrap_or_default(),
        [
            "worker",
            "--poll-interval-ms",
            "500",
            "--concurrency",
            "4",
            "--health-port",
            "9091"
        ]
    );
    let probe = c
        .readiness_probe
        .as_ref()
        .and_then(|p| p.http_get.as_ref())
        .expect("readiness");
    assert_eq!(probe.port, IntOrString::String("health".into()));
    assert_eq!(
        c.ports
            .as_ref()
            .map(|p| (p[0].name.clone(), p[0].container_port)),
        Some((Some("health".into()), 9091))
    );
}

/// `managed()` with every security setting of the spec filled in.
fn secured() -> VmWebapp {
    app(serde_json::json!({
        "image": "img:2",
        "managedMode": true,
        "database": {"name": "db", "key": "url"},
        "redis": {"name": "redis", "key": "url"},
        "llm": {"apiKey": {"name": "llm", "key": "key"}, "model": "m"},
        "auth": {"apiKeys": {"name": "api-keys", "key": "keys"}},
        "webhooks": {
            "secrets": {"name": "hooks", "key": "secrets"},
            "toleranceSeconds": 120,
            "allowedCidrs": ["10.0.0.0/8", "192.0.2.1"]
        },
        "api": {
            "trustedProxyHeader": "x-forwarded-for",
            "rateLimit": {"perKeyRps": 5, "perIpBurst": 7},
            "corsAllowedOrigins": ["https://a.example", "https://b.example"],
            "requestTimeoutMs": 45000,
            "shutdownDelayMs": 8000
        },
        "migrations": {
            "database": {"name": "db-owner", "key": "url"},
            "runtimeRole": "vm_app"
        }
    }))
}

/// A container's env as (name, literal value or `secret:name/key`).
fn env_of(p: &PodSpec) -> Vec<(String, String)> {
    p.containers[0]
        .env
        .iter()
        .flatten()
        .map(|e| {
            let shown = match (
                &e.value,
                e.value_from
                    .as_ref()
                    .and_then(|v| v.secret_key_ref.as_ref()),
            ) {
                (Some(v), None) => v.clone(),
                (None, Some(r)) => format!("secret:{}/{}", r.name, r.key),
                other => panic!(
                    "{} is neither a value nor a secretKeyRef: {other:?}",
                    e.name
                ),
            };
            (e.name.clone(), shown)
        })
        .collect()
}

const SECRET_VARS: [&str; 6] = [
    "VM_DB_URL",
    "VM_REDIS_URL",
    "KIMI_API_KEY",
    "VM_API_KEYS",
    "VM_WEBHOOK_SECRETS",
    "VM_MIGRATION_DB_URL",
];

#[test]
fn secrets_reach_pods_only_through_secret_key_refs() {
    let d = built(&secured());
    let data = d.config_map.data.clone().unwrap_or_default();
    for secret_var in SECRET_VARS {
        assert!(
            !data.contains_key(secret_var),
            "{secret_var} must not be in the ConfigMap"
        );
    }
    for p in all_pods(&d) {
        for e in p.containers[0].env.iter().flatten() {
            if SECRET_VARS.contains(&e.name.as_str()) {
                assert!(e.value.is_none(), "{} has a literal value", e.name);
                assert!(
                    e.value_from
                        .as_ref()
                        .and_then(|v| v.secret_key_ref.as_ref())
                        .is_some(),
                    "{} is not a secretKeyRef",
                    e.name
                );
            }
        }
    }
}

#[test]
fn each_workload_gets_only_the_secrets_it_needs() {
    let d = built(&secured());
    let secrets = |p: &PodSpec| -> Vec<String> {
        env_of(p)
            .into_iter()
            .filter(|(_, v)| v.starts_with("secret:"))
            .map(|(n, _)| n)
            .collect()
    };
    assert_eq!(
        secrets(pod(&d.api_deployment)),
        [
            "VM_DB_URL",
            "VM_REDIS_URL",
            "KIMI_API_KEY",
            "VM_API_KEYS",
            "VM_WEBHOOK_SECRETS"
        ]
    );
    // The worker and the Job parse VM_API_KEYS too (required for every command in
    // production), but never see webhook secrets; only the Job sees the owner's URL.
    assert_eq!(
        secrets(pod(&d.worker_deployment)),
        ["VM_DB_URL", "VM_REDIS_URL", "KIMI_API_KEY", "VM_API_KEYS"]
    );
    let job = d.migration_job.as_ref().expect("job");
    let job_pod = job
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("pod");
    assert_eq!(
        secrets(job_pod),
        [
            "VM_DB_URL",
            "VM_REDIS_URL",
            "KIMI_API_KEY",
            "VM_API_KEYS",
            "VM_MIGRATION_DB_URL"
        ]
    );
    assert!(
        env_of(job_pod).contains(&("VM_MIGRATION_DB_URL".into(), "secret:db-owner/url".into()))
    );
    assert!(
        env_of(pod(&d.api_deployment))
            .contains(&("VM_API_KEYS".into(), "secret:api-keys/keys".into()))
    );
}

#[test]
fn http_settings_go_to_the_api_container_only() {
    let d = built(&secured());
    let literal = |p: &PodSpec| -> Vec<(String, String)> {
        env_of(p)
            .into_iter()
            .filter(|(_, v)| !v.starts_with("secret:"))
            .collect()
    };
    let pairs = |v: &[(&str, &str)]| -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
            .collect()
    };
    assert_eq!(
        literal(pod(&d.api_deployment)),
        pairs(&[
            ("VM_WEBHOOK_TOLERANCE_SECONDS", "120"),
            ("VM_WEBHOOK_ALLOWED_CIDRS", "10.0.0.0/8,192.0.2.1"),
            ("VM_TRUSTED_PROXY_HEADER", "x-forwarded-for"),
            ("VM_RATE_LIMIT_KEY_RPS", "5"),
            ("VM_RATE_LIMIT_IP_BURST", "7"),
            (
                "VM_CORS_ALLOWED_ORIGINS",
                "https://a.example,https://b.example"
            ),
            ("VM_REQUEST_TIMEOUT_MS", "45000"),
            ("VM_SHUTDOWN_DELAY_MS", "8000"),
        ])
    );
    assert!(literal(pod(&d.worker_deployment)).is_empty());
    let job = d.migration_job.as_ref().expect("job");
    let job_pod = job
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("pod");
    assert_eq!(literal(job_pod), pairs(&[("VM_RUNTIME_DB_ROLE", "vm_app")]));
    let data = d.config_map.data.clone().unwrap_or_default();
    assert!(
        data.keys().all(|k| !k.starts_with("VM_RATE")
            && !k.starts_with("VM_WEBHOOK")
            && k != "VM_SHUTDOWN_DELAY_MS"),
        "workload settings stay out of the shared ConfigMap: {data:?}"
    );
}

#[test]
fn the_api_shuts_down_after_a_default_delay_and_its_grace_period_covers_it() {
    // Defaults: 5 s delay + max(30 s request timeout, 20 s job grace) + 5 s slack.
    let d = built(&managed());
    assert!(
        env_of(pod(&d.api_deployment)).contains(&("VM_SHUTDOWN_DELAY_MS".into(), "5000".into()))
    );
    assert_eq!(
        pod(&d.api_deployment).termination_grace_period_seconds,
        Some(40)
    );
    assert_eq!(
        pod(&d.worker_deployment).termination_grace_period_seconds,
        Some(60)
    );
    // 8 s delay + 45 s request timeout + 5 s.
    let d = built(&secured());
    assert_eq!(
        pod(&d.api_deployment).termination_grace_period_seconds,
        Some(58)
    );
}

#[test]
fn a_longer_stream_write_timeout_in_extra_env_lengthens_the_api_grace_period() {
    // A stream ended at SIGTERM whose client stopped reading holds the drain until its
    // write times out; a grace period shorter than that SIGKILLs the API mid-drain.
    // API: 5 s delay + 120 s + 5 s; the worker keeps its default.
    assert_eq!(
        grace_periods_with_env("VM_STREAM_WRITE_TIMEOUT_MS", "120000"),
        (Some(130), Some(60))
    );
}

/// The (API, worker) grace periods of the managed example with `name=value`
/// added through `spec.env`.
fn grace_periods_with_env(name: &str, value: &str) -> (Option<i64>, Option<i64>) {
    let mut a = managed();
    a.spec.env.push(ExtraEnvVar {
        name: name.into(),
        value: Some(value.into()),
        secret_key_ref: None,
    });
    let d = built(&a);
    (
        pod(&d.api_deployment).termination_grace_period_seconds,
        pod(&d.worker_deployment).termination_grace_period_seconds,
    )
}

#[test]
fn a_longer_job_grace_in_extra_env_lengthens_both_grace_periods() {
    // Without this, raising VM_SHUTDOWN_GRACE_MS through spec.env would let the kubelet
    // SIGKILL workers mid-drain, turning a clean hand-back into lease expiries.
    assert_eq!(
        grace_periods_with_env("VM_SHUTDOWN_GRACE_MS", "90000"),
        (Some(100), Some(100))
    );
}

#[test]
fn new_secret_references_are_hashed_and_checked_like_the_others() {
    let a = secured();
    let refs: Vec<(&str, &str)> = a
        .spec
        .secret_refs()
        .iter()
        .map(|r| (r.name.as_str(), r.key.as_str()))
        .collect();
    for wanted in [
        ("api-keys", "keys"),
        ("hooks", "secrets"),
        ("db-owner", "url"),
    ] {
        assert!(refs.contains(&wanted), "{wanted:?} missing from {refs:?}");
    }
    assert!(
        a.spec.references_secret("api-keys"),
        "the Secret watch wakes on it"
    );
    // Rotating API keys (add the new one, later drop the old one) rolls the pods.
    let mut inputs = Inputs::offline(&a);
    let key = ("api-keys".to_owned(), "keys".to_owned());
    inputs
        .secret_data
        .insert(key.clone(), Some(b"old:0123456789abcdef".to_vec()));
    let before = build(&a, &inputs).expect("builds");
    inputs.secret_data.insert(
        key,
        Some(b"old:0123456789abcdef,new:fedcba9876543210".to_vec()),
    );
    let after = build(&a, &inputs).expect("builds");
    assert_ne!(before.config_hash, after.config_hash);
}

#[test]
fn every_pod_runs_with_restricted_security() {
    let d = built(&managed());
    for p in all_pods(&d) {
        let psc = p.security_context.as_ref().expect("pod security context");
        assert_eq!(psc.run_as_non_root, Some(true));
        assert_eq!(
            psc.seccomp_profile.as_ref().map(|s| s.type_.as_str()),
            Some("RuntimeDefault")
        );
        let c = &p.containers[0];
        let sc = c
            .security_context
            .as_ref()
            .expect("container security context");
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(
            sc.capabilities.as_ref().and_then(|c| c.drop.clone()),
            Some(vec!["ALL".to_owned()])
        );
        let mounts: Vec<&str> = c
            .volume_mounts
            .iter()
            .flatten()
            .map(|m| m.mount_path.as_str())
            .collect();
        assert_eq!(mounts, ["/var/data/vm", "/tmp"]);
        assert!(p.volumes.iter().flatten().all(|v| v.empty_dir.is_some()));
    }
}

#[test]
fn autoscaling_leaves_replicas_to_the_hpa() {
    let mut a = managed();
    assert_eq!(
        built(&a)
            .api_deployment
            .spec
            .as_ref()
            .and_then(|s| s.replicas),
        Some(2)
    );
    assert!(built(&a).api_hpa.is_none());
    a.spec.api.autoscaling = Some(crate::crd::AutoscalingSpec {
        min_replicas: 2,
        max_replicas: 5,
        target_cpu_utilization_percentage: 60,
    });
    // A first install starts at the HPA's minimum: created without `replicas` the
    // Deployment would run one pod (the API server's default) until the HPA scales it.
    let first = built(&a);
    assert_eq!(
        first.api_deployment.spec.as_ref().and_then(|s| s.replicas),
        Some(2)
    );
    // Once it exists, the HPA owns the field and the operator leaves it out.
    let mut inputs = Inputs::offline(&a);
    inputs.creating_api = false;
    let d = build(&a, &inputs).expect("builds");
    assert_eq!(
        d.api_deployment.spec.as_ref().and_then(|s| s.replicas),
        None
    );
    let hpa = d.api_hpa.expect("hpa");
    let spec = hpa.spec.expect("hpa spec");
    assert_eq!(spec.scale_target_ref.name, "shop-api");
    assert_eq!((spec.min_replicas, spec.max_replicas), (Some(2), 5));
    assert_eq!(
        d.worker_deployment.spec.as_ref().and_then(|s| s.replicas),
        Some(1)
    );
}

#[test]
fn every_child_is_labelled_and_owned_by_the_resource() {
    let d = built(&managed());
    for obj in d.objects().expect("serialises") {
        let meta = &obj["metadata"];
        assert_eq!(
            meta["labels"]["app.kubernetes.io/instance"], "shop",
            "{}",
            obj["kind"]
        );
        assert_eq!(
            meta["labels"]["app.kubernetes.io/managed-by"],
            "vm-operator"
        );
        assert_eq!(meta["ownerReferences"][0]["uid"], "1234");
        assert_eq!(meta["ownerReferences"][0]["controller"], true);
        assert_eq!(meta["namespace"], "prod");
    }
}

#[test]
fn rotating_a_referenced_secret_changes_the_pod_template_hash() {
    let a = managed();
    let mut inputs = Inputs::offline(&a);
    inputs.secret_data.insert(
        ("db".into(), "url".into()),
        Some(b"postgres://one".to_vec()),
    );
    let before = build(&a, &inputs).expect("builds");
    inputs.secret_data.insert(
        ("db".into(), "url".into()),
        Some(b"postgres://two".to_vec()),
    );
    let after = build(&a, &inputs).expect("builds");
    assert_ne!(before.config_hash, after.config_hash);
    let annotation = |d: &Desired| {
        d.api_deployment
            .spec
            .as_ref()
            .and_then(|s| s.template.metadata.as_ref())
            .and_then(|m| m.annotations.clone())
    };
    assert_ne!(annotation(&before), annotation(&after));
    assert_eq!(
        build(&a, &inputs).expect("builds").config_hash,
        after.config_hash,
        "hash is deterministic"
    );
}

#[test]
fn changing_a_config_value_changes_the_hash() {
    let a = managed();
    let mut b = a.clone();
    b.spec.log_level = "debug".into();
    assert_ne!(built(&a).config_hash, built(&b).config_hash);
}

#[test]
fn migration_job_runs_migrate_with_the_spec_image_and_never_restarts() {
    let mut a = managed();
    let mut inputs = Inputs::offline(&a);
    inputs.serving_image = "img:1".into();
    let d = build(&a, &inputs).expect("builds");
    let job = d.migration_job.expect("job");
    let pod = job
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("pod");
    assert_eq!(
        pod.containers[0].args.clone().unwrap_or_default(),
        ["migrate"]
    );
    assert_eq!(pod.containers[0].image.as_deref(), Some("img:2"));
    assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
    assert_eq!(
        container(&d.api_deployment).image.as_deref(),
        Some("img:1"),
        "deployments keep the serving image"
    );
    assert_eq!(
        job.metadata.name,
        Some(names::migration_job("shop", "img:2"))
    );
    a.spec.migrations.enabled = false;
    assert!(built(&a).migration_job.is_none());
}

#[test]
fn extra_env_values_go_to_the_config_map_and_secret_entries_to_secret_key_refs() {
    let mut a = managed();
    a.spec.env = vec![
        ExtraEnvVar {
            name: "FEATURE_X".into(),
            value: Some("on".into()),
            secret_key_ref: None,
        },
        ExtraEnvVar {
            name: "WEBHOOK_SECRET".into(),
            value: None,
            secret_key_ref: Some(SecretKeyRef {
                name: "hooks".into(),
                key: "secret".into(),
            }),
        },
    ];
    let d = built(&a);
    assert_eq!(
        d.config_map
            .data
            .as_ref()
            .and_then(|m| m.get("FEATURE_X"))
            .map(String::as_str),
        Some("on")
    );
    let env = container(&d.api_deployment).env.clone().unwrap_or_default();
    assert!(env.iter().any(|e| e.name == "WEBHOOK_SECRET"));
    assert!(VmWebappSpec::references_secret(&a.spec, "hooks"));
    assert!(!a.spec.references_secret("unrelated"));
}

#[test]
fn a_resource_without_namespace_is_rejected() {
    let mut a = managed();
    a.metadata.namespace = None;
    assert!(matches!(
        build(&a, &Inputs::offline(&a)),
        Err(BuildError::MissingNamespace)
    ));
}

#[test]
fn migration_job_has_no_ttl_so_a_failed_one_is_not_silently_retried() {
    // With a TTL the Job controller deleted a failed Job after a day; the operator then found
    // no Job for the image and ran the failed migration again, every day.
    let app = crate::fixtures::app_from_example(
        include_str!("../../../examples/production.yaml"),
        "vm-prod",
    );
    let desired = build(&app, &Inputs::offline(&app)).expect("builds");
    let job = desired.migration_job.expect("production migrates");
    assert_eq!(job.spec.and_then(|s| s.ttl_seconds_after_finished), None);
}

#[test]
fn a_request_above_its_limit_is_an_invalid_spec_naming_the_field() {
    // Issue kind: the API server refuses such a Deployment; the operator says why
    // (InvalidSpec) instead of failing on every pass.
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    let mut a = managed();
    let r = &mut a.spec.worker.resources;
    r.requests = Some([("memory".to_owned(), Quantity("1Gi".into()))].into());
    r.limits = Some([("memory".to_owned(), Quantity("512Mi".into()))].into());
    let err = build(&a, &Inputs::offline(&a)).expect_err("request above limit");
    let text = err.to_string();
    assert!(text.contains("spec.worker.resources"), "{text}");
    assert!(
        text.contains("requests.memory (1Gi) exceeds limits.memory (512Mi)"),
        "{text}"
    );
    // Equal amounts in different spellings are fine.
    a.spec.worker.resources.limits =
        Some([("memory".to_owned(), Quantity("1024Mi".into()))].into());
    assert!(build(&a, &Inputs::offline(&a)).is_ok());
}

#[test]
fn plans_are_mounted_read_only_for_the_api_and_worker_and_their_change_rolls_the_pods() {
    let mut a = managed();
    a.spec.plans = Some(crate::crd::ConfigMapKeyRef {
        name: "billing".into(),
        key: "plans.yaml".into(),
    });
    let mut inputs = Inputs::offline(&a);
    inputs.plans = Some("default_plan: free\n".into());
    let d = build(&a, &inputs).expect("builds");
    for deployment in [&d.api_deployment, &d.worker_deployment] {
        let p = pod(deployment);
        let volume = p
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == "plans")
            .and_then(|v| v.config_map.as_ref())
            .expect("plans volume");
        assert_eq!(volume.name, "billing");
        let items = volume.items.clone().unwrap_or_default();
        assert_eq!(
            (items[0].key.as_str(), items[0].path.as_str()),
            ("plans.yaml", "plans.yaml")
        );
        let mount = container(deployment)
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == "plans")
            .expect("plans mount");
        assert_eq!(mount.read_only, Some(true));
        // The file the app is told to read is the mounted key.
        assert_eq!(
            crate::consts::app::PLANS_FILE,
            format!("{}/{}", mount.mount_path, items[0].path)
        );
        assert!(
            env_of(p).contains(&(
                "VM_PLANS_FILE".into(),
                crate::consts::app::PLANS_FILE.into()
            )),
            "{:?}",
            env_of(p)
        );
    }
    let job = d.migration_job.as_ref().expect("migration job");
    let job_pod = job
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("job pod");
    assert!(job_pod.volumes.iter().flatten().all(|v| v.name != "plans"));
    assert!(env_of(job_pod).iter().all(|(n, _)| n != "VM_PLANS_FILE"));

    inputs.plans = Some("default_plan: pro\n".into());
    let changed = build(&a, &inputs).expect("builds");
    assert_ne!(d.config_hash, changed.config_hash);
    // Without plans, the hash is what it was before the field existed.
    let plain = managed();
    assert_eq!(
        built(&plain).config_hash,
        config_hash(
            &built(&plain).config_map,
            &Inputs::offline(&plain).secret_data,
            None
        )
    );
}
