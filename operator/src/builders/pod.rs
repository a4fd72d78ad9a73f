//! Pod templates of the API, the worker and the migration Job: command line, environment
//! (ConfigMap via `envFrom`, secrets only via `secretKeyRef`), probes, restricted security
//! context and the writable emptyDir mounts a read-only root filesystem needs.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapEnvSource, Container, ContainerPort, EmptyDirVolumeSource,
    EnvFromSource, EnvVar, EnvVarSource, HTTPGetAction, PodSecurityContext, PodSpec,
    PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile, SecretKeySelector,
    SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{Ident, names};
use crate::consts::{annotations, app as contract, component};
use crate::crd::VmWebapp;

/// Which program a pod runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// `vm-webapp serve`.
    Api,
    /// `vm-webapp worker`.
    Worker,
    /// `vm-webapp migrate`.
    Migration,
}

impl Workload {
    fn component(self) -> &'static str {
        match self {
            Self::Api => component::API,
            Self::Worker => component::WORKER,
            Self::Migration => component::MIGRATION,
        }
    }

    /// The arguments after the `vm-webapp` executable.
    pub fn args(self, app: &VmWebapp) -> Vec<String> {
        let spec = &app.spec;
        let v: Vec<String> = match self {
            Self::Api => vec![
                "serve".into(),
                "--host".into(),
                "0.0.0.0".into(),
                "--port".into(),
                spec.api.port.to_string(),
            ],
            Self::Worker => vec![
                "worker".into(),
                "--poll-interval-ms".into(),
                spec.worker.poll_interval_ms.to_string(),
                "--concurrency".into(),
                spec.worker.concurrency.to_string(),
                "--health-port".into(),
                spec.worker.health_port.to_string(),
            ],
            Self::Migration => vec!["migrate".into()],
        };
        v
    }
}

/// Pod template of a workload running `image`.
pub(super) fn template(
    app: &VmWebapp,
    id: &Ident,
    workload: Workload,
    image: &str,
    config_hash: &str,
) -> PodTemplateSpec {
    let spec = &app.spec;
    let (ports, probes, resources): (Vec<ContainerPort>, Probes, ResourceRequirements) =
        match workload {
            Workload::Api => (
                vec![port(contract::HTTP_PORT_NAME, spec.api.port)],
                Probes::http(contract::HTTP_PORT_NAME),
                spec.api.resources.clone(),
            ),
            Workload::Worker => (
                vec![port(contract::HEALTH_PORT_NAME, spec.worker.health_port)],
                Probes::http(contract::HEALTH_PORT_NAME),
                spec.worker.resources.clone(),
            ),
            Workload::Migration => (Vec::new(), Probes::default(), spec.worker.resources.clone()),
        };
    let container = Container {
        name: workload.component().to_owned(),
        image: Some(image.to_owned()),
        image_pull_policy: spec.image_pull_policy.map(|p| p.as_str().to_owned()),
        command: Some(vec![contract::COMMAND.to_owned()]),
        args: Some(workload.args(app)),
        ports: (!ports.is_empty()).then_some(ports),
        env_from: Some(vec![EnvFromSource {
            config_map_ref: Some(ConfigMapEnvSource {
                name: names::config_map(&id.name),
                optional: Some(false),
            }),
            ..EnvFromSource::default()
        }]),
        env: Some(secret_env(app)).filter(|e| !e.is_empty()),
        liveness_probe: probes.liveness,
        readiness_probe: probes.readiness,
        startup_probe: probes.startup,
        resources: Some(resources),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: None,
            }),
            seccomp_profile: Some(runtime_default()),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                name: "data".into(),
                mount_path: contract::WORKSPACE_ROOT.into(),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: "tmp".into(),
                mount_path: contract::TMP_DIR.into(),
                ..VolumeMount::default()
            },
        ]),
        ..Container::default()
    };
    let (restart_policy, grace) = match workload {
        Workload::Api => (None, 30),
        // A worker finishes (or hands back) its claimed jobs before exiting.
        Workload::Worker => (None, 60),
        Workload::Migration => (Some("Never".to_owned()), 30),
    };
    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(id.labels(workload.component())),
            annotations: Some(BTreeMap::from([(
                annotations::CONFIG_HASH.to_owned(),
                config_hash.to_owned(),
            )])),
            ..ObjectMeta::default()
        }),
        spec: Some(PodSpec {
            service_account_name: Some(names::base(&id.name)),
            automount_service_account_token: Some(false),
            restart_policy,
            termination_grace_period_seconds: Some(grace),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(contract::RUN_AS_USER),
                run_as_group: Some(contract::RUN_AS_USER),
                fs_group: Some(contract::RUN_AS_USER),
                seccomp_profile: Some(runtime_default()),
                ..PodSecurityContext::default()
            }),
            containers: vec![container],
            volumes: Some(vec![
                Volume {
                    name: "data".into(),
                    empty_dir: Some(EmptyDirVolumeSource::default()),
                    ..Volume::default()
                },
                Volume {
                    name: "tmp".into(),
                    empty_dir: Some(EmptyDirVolumeSource::default()),
                    ..Volume::default()
                },
            ]),
            ..PodSpec::default()
        }),
    }
}

/// Secret-backed variables, each a `secretKeyRef` (never a value).
fn secret_env(app: &VmWebapp) -> Vec<EnvVar> {
    let spec = &app.spec;
    let fixed = [
        ("VM_DB_URL", &spec.database),
        ("VM_REDIS_URL", &spec.redis),
        ("KIMI_API_KEY", &spec.llm.api_key),
    ];
    let fixed = fixed
        .into_iter()
        .filter_map(|(n, r)| r.as_ref().map(|r| (n.to_owned(), r)));
    let extra = spec
        .env
        .iter()
        .filter_map(|e| e.secret_key_ref.as_ref().map(|r| (e.name.clone(), r)));
    fixed
        .chain(extra)
        .map(|(name, r)| EnvVar {
            name,
            value: None,
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: r.name.clone(),
                    key: r.key.clone(),
                    optional: Some(false),
                }),
                ..EnvVarSource::default()
            }),
        })
        .collect()
}

fn port(name: &str, number: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.to_owned()),
        container_port: number,
        protocol: Some("TCP".into()),
        ..ContainerPort::default()
    }
}

fn runtime_default() -> SeccompProfile {
    SeccompProfile {
        type_: "RuntimeDefault".into(),
        localhost_profile: None,
    }
}

#[derive(Default)]
struct Probes {
    liveness: Option<Probe>,
    readiness: Option<Probe>,
    startup: Option<Probe>,
}

impl Probes {
    fn http(port_name: &str) -> Self {
        let get = |path: &str, period: i32, failures: i32| Probe {
            http_get: Some(HTTPGetAction {
                path: Some(path.to_owned()),
                port: IntOrString::String(port_name.to_owned()),
                scheme: Some("HTTP".into()),
                ..HTTPGetAction::default()
            }),
            period_seconds: Some(period),
            timeout_seconds: Some(2),
            failure_threshold: Some(failures),
            ..Probe::default()
        };
        Self {
            liveness: Some(get(contract::LIVE_PATH, 10, 3)),
            readiness: Some(get(contract::READY_PATH, 5, 3)),
            // Up to two minutes to start (first connection to the database, cache warm-up)
            // before liveness may kill the container.
            startup: Some(get(contract::LIVE_PATH, 2, 60)),
        }
    }
}
