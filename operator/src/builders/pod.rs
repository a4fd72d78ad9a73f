//! Pod templates of the API, the worker and the migration Job: command line, environment
//! (shared ConfigMap via `envFrom`, settings only one workload reads as literal `env`
//! entries, secrets only via `secretKeyRef`), probes, termination grace periods that cover
//! the app's shutdown sequence, restricted security context and the writable emptyDir
//! mounts a read-only root filesystem needs.
//!
//! Who gets what beyond the shared ConfigMap:
//! - API: `VM_WEBHOOK_SECRETS`, webhook tolerance and allowed CIDRs, trusted proxy header,
//!   rate limits, CORS origins, request timeout, shutdown delay;
//! - migration Job: `VM_MIGRATION_DB_URL` and `VM_RUNTIME_DB_ROLE`;
//! - backup CronJob: `VM_MIGRATION_DB_URL` and the backup claim mounted at
//!   `/var/backups/vm`;
//! - every workload: the database, Redis and LLM secrets, `VM_API_KEYS` (the app validates
//!   it for every command in production) and the `spec.env` secrets.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapEnvSource, ConfigMapVolumeSource, Container, ContainerPort,
    EmptyDirVolumeSource, EnvFromSource, EnvVar, EnvVarSource, HTTPGetAction, KeyToPath,
    PersistentVolumeClaimVolumeSource, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    ResourceRequirements, SeccompProfile, SecretKeySelector, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{Ident, names};
use crate::consts::{annotations, app as contract, component};
use crate::crd::{SecretKeyRef, VmWebapp};

/// Which program a pod runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// `vm-webapp serve`.
    Api,
    /// `vm-webapp worker`.
    Worker,
    /// `vm-webapp migrate`.
    Migration,
    /// `vm-webapp backup --output-dir … --keep …` (the backup CronJob).
    Backup,
}

impl Workload {
    fn component(self) -> &'static str {
        match self {
            Self::Api => component::API,
            Self::Worker => component::WORKER,
            Self::Migration => component::MIGRATION,
            Self::Backup => component::BACKUP,
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
            Self::Backup => vec![
                "backup".into(),
                "--output-dir".into(),
                contract::BACKUP_DIR.into(),
                "--keep".into(),
                spec.backup.as_ref().map_or(1, |b| b.retention).to_string(),
            ],
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
            Workload::Migration | Workload::Backup => {
                (Vec::new(), Probes::default(), spec.worker.resources.clone())
            }
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
        env: Some(env(app, workload)).filter(|e| !e.is_empty()),
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
        volume_mounts: Some(mounts(app, workload)),
        ..Container::default()
    };
    let restart_policy =
        matches!(workload, Workload::Migration | Workload::Backup).then(|| "Never".to_owned());
    let grace = termination_grace_seconds(app, workload);
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
            volumes: Some(volumes(app, workload)),
            ..PodSpec::default()
        }),
    }
}

/// Volumes of a workload's pod: the emptyDirs a read-only root filesystem needs, and for
/// backups the claim named in `spec.backup`.
fn volumes(app: &VmWebapp, workload: Workload) -> Vec<Volume> {
    let empty = |name: &str| Volume {
        name: name.into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Volume::default()
    };
    let mut out = vec![empty("data"), empty("tmp")];
    if let (Workload::Api | Workload::Worker, Some(plans)) = (workload, &app.spec.plans) {
        out.push(Volume {
            name: "plans".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: plans.name.clone(),
                items: Some(vec![KeyToPath {
                    key: plans.key.clone(),
                    path: "plans.yaml".into(),
                    mode: None,
                }]),
                // A missing ConfigMap keeps the pod Pending with an event, but the
                // operator reports it first (ConfigMapMissing) and changes no pod.
                optional: Some(false),
                default_mode: None,
            }),
            ..Volume::default()
        });
    }
    if let (Workload::Backup, Some(backup)) = (workload, &app.spec.backup) {
        out.push(Volume {
            name: "backups".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: backup.claim_name.clone(),
                read_only: Some(false),
            }),
            ..Volume::default()
        });
    }
    out
}

/// Mounts matching [`volumes`].
fn mounts(app: &VmWebapp, workload: Workload) -> Vec<VolumeMount> {
    let mount = |name: &str, path: &str| VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        ..VolumeMount::default()
    };
    let mut out = vec![
        mount("data", contract::WORKSPACE_ROOT),
        mount("tmp", contract::TMP_DIR),
    ];
    if matches!(workload, Workload::Api | Workload::Worker) && app.spec.plans.is_some() {
        out.push(VolumeMount {
            read_only: Some(true),
            ..mount("plans", contract::PLANS_DIR)
        });
    }
    if workload == Workload::Backup {
        out.push(mount("backups", contract::BACKUP_DIR));
    }
    out
}

/// `terminationGracePeriodSeconds` of a workload: long enough for the app's own shutdown
/// sequence, so the kubelet's SIGKILL never cuts a drain short.
///
/// - API: answers `not_ready` for `shutdownDelayMs`, then lets in-flight requests finish
///   (each bounded by the request timeout), ends its live-update streams (a stream's last
///   write to a client that stopped reading is bounded by `VM_STREAM_WRITE_TIMEOUT_MS`)
///   and, in local mode, the in-process worker drain its jobs (bounded by
///   `VM_SHUTDOWN_GRACE_MS`); plus 5 s of slack.
/// - Worker: drains its claimed jobs for `VM_SHUTDOWN_GRACE_MS`, then releases the rest;
///   at least 60 s, or that grace plus 10 s of slack.
/// - Migration and backup: 30 s (a killed one is retried by the Job; a killed backup
///   leaves only a `.partial` file, deleted by the next one).
pub(super) fn termination_grace_seconds(app: &VmWebapp, workload: Workload) -> i64 {
    let spec = &app.spec;
    let seconds = |ms: i64| (ms + 999) / 1000;
    let env_ms = |name: &str, default: i64| {
        spec.env
            .iter()
            .find(|e| e.name == name)
            .and_then(|e| e.value.as_deref())
            .and_then(|v| v.trim().parse::<i64>().ok())
            .unwrap_or(default)
    };
    let job_grace_ms = env_ms(
        contract::SHUTDOWN_GRACE_VAR,
        contract::DEFAULT_SHUTDOWN_GRACE_MS,
    );
    match workload {
        Workload::Api => {
            let request_ms = spec
                .api
                .request_timeout_ms
                .map_or(contract::DEFAULT_REQUEST_TIMEOUT_MS, i64::from);
            let stream_write_ms = env_ms(
                contract::STREAM_WRITE_TIMEOUT_VAR,
                contract::DEFAULT_STREAM_WRITE_TIMEOUT_MS,
            );
            seconds(i64::from(spec.api.shutdown_delay_ms))
                + seconds(request_ms.max(job_grace_ms).max(stream_write_ms))
                + 5
        }
        Workload::Worker => (seconds(job_grace_ms) + 10).max(60),
        Workload::Migration | Workload::Backup => 30,
    }
}

/// Non-secret settings that only `workload` reads, as literal `(name, value)` pairs. They
/// live on the container rather than in the shared ConfigMap so that, say, a CORS change
/// rolls only the API pods; being part of the pod template, a change still rolls them.
pub(super) fn workload_settings(app: &VmWebapp, workload: Workload) -> Vec<(&'static str, String)> {
    let spec = &app.spec;
    let mut out: Vec<(&'static str, String)> = Vec::new();
    let join = |items: &[String]| items.join(",");
    match workload {
        Workload::Api => {
            let api = &spec.api;
            let hooks = &spec.webhooks;
            if let Some(t) = hooks.tolerance_seconds {
                out.push(("VM_WEBHOOK_TOLERANCE_SECONDS", t.to_string()));
            }
            if !hooks.allowed_cidrs.is_empty() {
                out.push(("VM_WEBHOOK_ALLOWED_CIDRS", join(&hooks.allowed_cidrs)));
            }
            if let Some(h) = &api.trusted_proxy_header {
                out.push(("VM_TRUSTED_PROXY_HEADER", h.clone()));
            }
            if let Some(r) = &api.rate_limit {
                let limits = [
                    ("VM_RATE_LIMIT_KEY_RPS", r.per_key_rps),
                    ("VM_RATE_LIMIT_KEY_BURST", r.per_key_burst),
                    ("VM_RATE_LIMIT_IP_RPS", r.per_ip_rps),
                    ("VM_RATE_LIMIT_IP_BURST", r.per_ip_burst),
                ];
                out.extend(
                    limits
                        .into_iter()
                        .filter_map(|(n, v)| v.map(|v| (n, v.to_string()))),
                );
            }
            if !api.cors_allowed_origins.is_empty() {
                out.push(("VM_CORS_ALLOWED_ORIGINS", join(&api.cors_allowed_origins)));
            }
            if let Some(t) = api.request_timeout_ms {
                out.push(("VM_REQUEST_TIMEOUT_MS", t.to_string()));
            }
            out.push(("VM_SHUTDOWN_DELAY_MS", api.shutdown_delay_ms.to_string()));
        }
        Workload::Worker | Workload::Backup => {}
        Workload::Migration => {
            if let Some(role) = &spec.migrations.runtime_role {
                out.push(("VM_RUNTIME_DB_ROLE", role.clone()));
            }
        }
    }
    // Quotas are checked by the API (run creation) and usage thresholds by the worker
    // (step results); migrations and backups never read the plans.
    if matches!(workload, Workload::Api | Workload::Worker) && spec.plans.is_some() {
        out.push(("VM_PLANS_FILE", contract::PLANS_FILE.to_owned()));
    }
    out
}

/// Secret-backed variables of `workload`, as `(name, reference)` pairs.
pub(super) fn workload_secrets(app: &VmWebapp, workload: Workload) -> Vec<(String, &SecretKeyRef)> {
    let spec = &app.spec;
    // Every command parses the whole configuration, and in production that includes
    // VM_API_KEYS, so the worker and the Job need it too even though only `serve` uses it.
    let mut fixed = vec![
        ("VM_DB_URL", &spec.database),
        ("VM_REDIS_URL", &spec.redis),
        ("KIMI_API_KEY", &spec.llm.api_key),
        ("VM_API_KEYS", &spec.auth.api_keys),
    ];
    match workload {
        Workload::Api => fixed.push(("VM_WEBHOOK_SECRETS", &spec.webhooks.secrets)),
        Workload::Worker => {}
        // Backups read every table and restores write the append-only audit trail: both
        // need the schema owner, like migrations.
        Workload::Migration | Workload::Backup => {
            fixed.push(("VM_MIGRATION_DB_URL", &spec.migrations.database))
        }
    }
    let fixed = fixed
        .into_iter()
        .filter_map(|(n, r)| r.as_ref().map(|r| (n.to_owned(), r)));
    let extra = spec
        .env
        .iter()
        .filter_map(|e| e.secret_key_ref.as_ref().map(|r| (e.name.clone(), r)));
    fixed.chain(extra).collect()
}

/// The container's `env`: workload settings as literal values, then secrets, each a
/// `secretKeyRef` (never a value).
fn env(app: &VmWebapp, workload: Workload) -> Vec<EnvVar> {
    let settings = workload_settings(app, workload)
        .into_iter()
        .map(|(name, value)| EnvVar {
            name: name.to_owned(),
            value: Some(value),
            value_from: None,
        });
    let secrets = workload_secrets(app, workload)
        .into_iter()
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
        });
    settings.chain(secrets).collect()
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
            timeout_seconds: Some(contract::PROBE_TIMEOUT_SECONDS),
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
