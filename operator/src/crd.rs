//! The `VmWebapp` custom resource (`webapp.vm.dev/v1alpha1`).
//!
//! The Rust types here are the single source of the CRD: `vm-operator crd` prints the
//! schema derived from them (doc comments become field descriptions, serde defaults become
//! schema defaults, `x_kube(validation)` attributes become CEL `x-kubernetes-validations`).
//! The checked-in `crds/vmwebapps.webapp.vm.dev.yaml` is that output, verified by a test.

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Desired state of a vm-webapp installation: one API Deployment, one worker Deployment
/// and everything they need (configuration, secret references, Service, disruption
/// budgets, autoscaling, database migrations).
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "webapp.vm.dev",
    version = "v1alpha1",
    kind = "VmWebapp",
    plural = "vmwebapps",
    shortname = "vmw",
    namespaced,
    status = "VmWebappStatus",
    derive = "PartialEq",
    doc = "A vm-webapp installation: API and worker Deployments, configuration, secret references, Service, disruption budgets, autoscaling and migrations, reconciled by vm-operator.",
    validation = Rule::new("self.metadata.name.size() <= 40").message("metadata.name must be at most 40 characters so that child names stay within Kubernetes limits"),
    validation = Rule::new("self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')").message("metadata.name must be a DNS-1035 label (lower-case letters, digits and '-', starting with a letter and ending with a letter or digit): it names the API Service"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Image", type_ = "string", json_path = ".status.servingImage"),
    printcolumn(name = "API", type_ = "integer", json_path = ".status.apiReadyReplicas", description = "Ready API replicas"),
    printcolumn(name = "Worker", type_ = "integer", json_path = ".status.workerReadyReplicas", description = "Ready worker replicas"),
    printcolumn(name = "Last Backup", type_ = "date", json_path = ".status.backup.lastSuccessfulTime", description = "When the last scheduled backup succeeded", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[x_kube(
    validation = Rule::new("!self.managedMode || (has(self.database) && has(self.redis))").message("managedMode requires both spec.database and spec.redis secret references").reason(Reason::FieldValueRequired),
    validation = Rule::new("has(self.database) || (self.api.replicas <= 1 && !has(self.api.autoscaling) && self.worker.replicas == 0 && !has(self.worker.autoscaling))").message("without spec.database every pod keeps its own embedded SQLite file: run at most one API replica, no worker replicas and no autoscaling, or set spec.database"),
    validation = Rule::new("has(self.database) || !self.migrations.enabled").message("spec.migrations.enabled needs spec.database: without a shared database the migration Job would migrate a throwaway file"),
    validation = Rule::new("has(self.database) || self.appEnv == 'local'").message("appEnv staging and production need spec.database: only local mode embeds SQLite"),
    validation = Rule::new("self.api.port != self.worker.healthPort").message("spec.api.port and spec.worker.healthPort must differ"),
    validation = Rule::new("!has(self.backup) || has(self.database)").message("spec.backup needs spec.database: without a shared database a backup pod would back up an empty throwaway file").reason(Reason::FieldValueRequired),
    validation = Rule::new("self.appEnv != 'production' || (has(self.auth) && has(self.auth.apiKeys))").message("appEnv production requires spec.auth.apiKeys: the app refuses to start in production without API keys (VM_API_KEYS)").reason(Reason::FieldValueRequired),
)]
#[serde(rename_all = "camelCase")]
pub struct VmWebappSpec {
    /// Container image of vm-webapp, for example `ghcr.io/example/vm-webapp:1.4.2`.
    /// Changing it first runs the migration Job with the new image (when migrations are
    /// enabled); the Deployments move to it only after the Job succeeds.
    #[schemars(length(min = 1, max = 512))]
    pub image: String,

    /// Image pull policy of every container; Kubernetes' default applies when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<PullPolicy>,

    /// Application environment, passed as `APP_ENV`.
    #[serde(default)]
    pub app_env: AppEnv,

    /// Managed mode (`VM_ENABLE_MANAGED_MODE=true`): the app requires PostgreSQL
    /// (`spec.database`) and Redis (`spec.redis`) and refuses to start without them.
    #[serde(default)]
    pub managed_mode: bool,

    /// Secret key holding the database URL (`postgres://…`), injected as `VM_DB_URL`.
    /// Required for managed mode, for more than one API replica, for workers and for
    /// migrations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<SecretKeyRef>,

    /// Secret key holding the Redis URL, injected as `VM_REDIS_URL`. Required for managed mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<SecretKeyRef>,

    /// The LLM endpoint used by run steps (OpenAI-compatible chat completions).
    #[serde(default)]
    pub llm: LlmSpec,

    /// Who may call the API. Required in production (`appEnv: production`).
    #[serde(default)]
    pub auth: AuthSpec,

    /// Signed webhook deliveries (`POST /api/v2/webhooks/{source}`), served by the API.
    #[serde(default)]
    pub webhooks: WebhooksSpec,

    /// Log level of the app, passed as `LOG_LEVEL` (for example `info`, `debug`, `warn`).
    #[serde(default = "default_log_level")]
    #[schemars(length(min = 1, max = 64))]
    pub log_level: String,

    /// Log format of the app, passed as `LOG_FORMAT`.
    #[serde(default)]
    pub log_format: LogFormat,

    /// The HTTP API (`vm-webapp serve`).
    #[serde(default)]
    pub api: ApiSpec,

    /// The background worker (`vm-webapp worker`).
    #[serde(default)]
    pub worker: WorkerSpec,

    /// Database migrations (`vm-webapp migrate`), run as a Job before a new image rolls out.
    #[serde(default)]
    pub migrations: MigrationsSpec,

    /// Scheduled logical backups (`vm-webapp backup`) to a PersistentVolumeClaim, run by a
    /// CronJob with the migration credentials. Unset: no backups (rely on the database
    /// provider's point-in-time recovery).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupSpec>,

    /// Tenant plans (allowances, overage policy and prices per meter): a key of a ConfigMap
    /// in this namespace holding the plans YAML. It is mounted read-only into the API and
    /// worker pods and named by `VM_PLANS_FILE`; a change to it rolls those pods, since the
    /// app validates the file at start-up. Unset: no quotas, usage is still metered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plans: Option<ConfigMapKeyRef>,

    /// Extra environment variables for every container. Names the operator sets itself
    /// (`APP_ENV`, `LOG_*`, `PORT`, `KIMI_*` and the `VM_*` variables behind spec fields)
    /// are rejected; other app settings (for example `VM_SHUTDOWN_GRACE_MS` or
    /// `VM_WORKER_STALE_MS`) may be set here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(validation = Rule::new("self.all(e, !(e.name in ['APP_ENV', 'VM_ENABLE_MANAGED_MODE', 'VM_DB_URL', 'VM_REDIS_URL', 'VM_WORKSPACE_ROOT', 'KIMI_MODEL', 'KIMI_BASE_URL', 'KIMI_API_KEY', 'LOG_LEVEL', 'LOG_FORMAT', 'PORT', 'VM_API_KEYS', 'VM_WEBHOOK_SECRETS', 'VM_WEBHOOK_TOLERANCE_SECONDS', 'VM_WEBHOOK_ALLOWED_CIDRS', 'VM_TRUSTED_PROXY_HEADER', 'VM_RATE_LIMIT_KEY_RPS', 'VM_RATE_LIMIT_KEY_BURST', 'VM_RATE_LIMIT_IP_RPS', 'VM_RATE_LIMIT_IP_BURST', 'VM_CORS_ALLOWED_ORIGINS', 'VM_REQUEST_TIMEOUT_MS', 'VM_SHUTDOWN_DELAY_MS', 'VM_MIGRATION_DB_URL', 'VM_RUNTIME_DB_ROLE', 'VM_PLANS_FILE']))").message("spec.env must not set a variable the operator manages"))]
    #[schemars(length(max = 64))]
    pub env: Vec<ExtraEnvVar>,

    /// Stop changing children: while `true` the operator applies nothing, runs no
    /// migration and only reports status. Existing pods keep running.
    #[serde(default)]
    pub suspend: bool,
}

fn default_log_level() -> String {
    "info".to_owned()
}

/// `APP_ENV` of the app.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AppEnv {
    /// Single-process development mode (the API also runs the worker in-process).
    Local,
    /// Staging.
    Staging,
    /// Production (the default in a cluster).
    #[default]
    Production,
}

impl AppEnv {
    /// The value of `APP_ENV`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Staging => "staging",
            Self::Production => "production",
        }
    }
}

/// `LOG_FORMAT` of the app.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object per line (the default in a cluster).
    #[default]
    Json,
    /// Human-readable lines.
    Pretty,
}

impl LogFormat {
    /// The value of `LOG_FORMAT`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Json => "json",
            Self::Pretty => "pretty",
        }
    }
}

/// Container image pull policy.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PullPolicy {
    /// Always pull.
    Always,
    /// Pull only when the image is missing on the node.
    IfNotPresent,
    /// Never pull.
    Never,
}

impl PullPolicy {
    /// The Kubernetes spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Always => "Always",
            Self::IfNotPresent => "IfNotPresent",
            Self::Never => "Never",
        }
    }
}

/// A key of a Secret in the resource's namespace. Only the reference is stored; the
/// value reaches the pods through `secretKeyRef` and never passes through the operator's
/// logs, events or status.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq, Eq)]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key inside the Secret's data.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// A key of a ConfigMap in the resource's namespace.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq, Eq)]
pub struct ConfigMapKeyRef {
    /// Name of the ConfigMap.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key inside the ConfigMap's data.
    #[serde(default = "default_plans_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

fn default_plans_key() -> String {
    "plans.yaml".to_owned()
}

/// The LLM endpoint.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct LlmSpec {
    /// Model name, passed as `KIMI_MODEL`; the app's default applies when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Base URL of the OpenAI-compatible API, passed as `KIMI_BASE_URL`; the app's default
    /// applies when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
    /// Secret key holding the API key, injected as `KIMI_API_KEY`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<SecretKeyRef>,
}

/// Authentication of API callers.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AuthSpec {
    /// Secret key holding the API keys, injected as `VM_API_KEYS`: comma-separated
    /// `id:key[:roles][:tenant=NAME]` entries (roles `admin`, `approver` or `admin+approver`;
    /// `tenant=webhook/SOURCE` for the tenant of a webhook source's runs), each key at least
    /// 16 characters. Required when `appEnv` is
    /// `production` (the app refuses to start without it); without it staging and local run
    /// the API open, with a warning. Rotate without downtime: add the new entry next to the
    /// old one, let the pods roll (the config hash covers this key), move the clients, then
    /// remove the old entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_keys: Option<SecretKeyRef>,
}

/// Signed webhook deliveries.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct WebhooksSpec {
    /// Secret key holding the webhook signing secrets, injected into the API as
    /// `VM_WEBHOOK_SECRETS`: comma-separated `source:secret` entries, each secret at least
    /// 16 characters. A source may appear twice while its secret is rotated. Unset: every
    /// webhook delivery is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secrets: Option<SecretKeyRef>,
    /// Accepted clock skew and replay window of a signed delivery in seconds
    /// (`VM_WEBHOOK_TOLERANCE_SECONDS`); the app's default (300) applies when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86400))]
    pub tolerance_seconds: Option<i32>,
    /// Addresses or CIDR blocks webhook senders may come from
    /// (`VM_WEBHOOK_ALLOWED_CIDRS`); empty allows any sender. Behind a proxy or load
    /// balancer set `spec.api.trustedProxyHeader` too, or every sender looks like the proxy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(validation = Rule::new("self.all(c, c.matches('^[0-9A-Fa-f:.]+(/[0-9]{1,3})?$'))").message("spec.webhooks.allowedCidrs entries must be IP addresses or CIDR blocks such as 10.0.0.0/8"))]
    #[schemars(length(max = 64), inner(length(min = 2, max = 64)))]
    pub allowed_cidrs: Vec<String>,
}

/// The HTTP API Deployment.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ApiSpec {
    /// Number of API pods when autoscaling is off (ignored while `autoscaling` is set).
    #[serde(default = "default_api_replicas")]
    #[schemars(range(min = 1, max = 100))]
    pub replicas: i32,
    /// Port the API listens on inside the pod (`serve --port`). Ports below 1024 need
    /// privileges the restricted pod security does not grant.
    #[serde(default = "default_api_port")]
    #[schemars(range(min = 1024, max = 65535))]
    pub port: i32,
    /// CPU and memory requests and limits of the API container.
    #[serde(default = "default_api_resources")]
    pub resources: ResourceRequirements,
    /// The Service in front of the API.
    #[serde(default)]
    pub service: ServiceSpec,
    /// Horizontal pod autoscaling; when set, an HPA owns the replica count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingSpec>,
    /// Request header that carries the client address, set by a trusted proxy or load
    /// balancer in front of the API (`VM_TRUSTED_PROXY_HEADER`, for example
    /// `x-forwarded-for`). Per-address rate limits and `spec.webhooks.allowedCidrs` use it.
    /// Leave unset when clients reach the pods directly: anyone could forge the header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z0-9_-]+$')").message("spec.api.trustedProxyHeader must be a header name such as x-forwarded-for"))]
    #[schemars(length(min = 1, max = 128))]
    pub trusted_proxy_header: Option<String>,
    /// Token-bucket rate limits per API key and per client address; the app's defaults
    /// apply to every field left unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitSpec>,
    /// Browser origins allowed to call the API cross-origin
    /// (`VM_CORS_ALLOWED_ORIGINS`, for example `https://app.example.com`); empty sends no
    /// CORS headers at all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(validation = Rule::new("self.all(o, o.matches('^https?://[^/, ]+/?$'))").message("spec.api.corsAllowedOrigins entries must be origins such as https://app.example.com"))]
    #[schemars(length(max = 32), inner(length(min = 8, max = 253)))]
    pub cors_allowed_origins: Vec<String>,
    /// Upper bound on one request in milliseconds (`VM_REQUEST_TIMEOUT_MS`); the app's
    /// default (30000) applies when unset. The pod's termination grace period grows with it
    /// so in-flight requests can finish during a rollout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 100, max = 600000))]
    pub request_timeout_ms: Option<i32>,
    /// After SIGTERM, how long an API pod keeps serving while answering `not_ready`
    /// (`VM_SHUTDOWN_DELAY_MS`), so that Service endpoints and load balancers stop sending
    /// it traffic before its listener closes. A few seconds avoids failed requests during
    /// rollouts; the termination grace period is extended by the same amount.
    #[serde(default = "default_shutdown_delay_ms")]
    #[schemars(range(min = 0, max = 120000))]
    pub shutdown_delay_ms: i32,
}

/// Token-bucket rate limits of the API. `0` disables a limit.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitSpec {
    /// Sustained requests per second per API key (`VM_RATE_LIMIT_KEY_RPS`; app default 20).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100000))]
    pub per_key_rps: Option<i32>,
    /// Burst per API key (`VM_RATE_LIMIT_KEY_BURST`; app default 40).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000000))]
    pub per_key_burst: Option<i32>,
    /// Sustained requests per second per client address (`VM_RATE_LIMIT_IP_RPS`; app
    /// default 50).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100000))]
    pub per_ip_rps: Option<i32>,
    /// Burst per client address (`VM_RATE_LIMIT_IP_BURST`; app default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000000))]
    pub per_ip_burst: Option<i32>,
}

fn default_shutdown_delay_ms() -> i32 {
    5000
}

fn default_api_replicas() -> i32 {
    2
}

fn default_api_port() -> i32 {
    8080
}

fn default_api_resources() -> ResourceRequirements {
    resources("100m", "256Mi", "512Mi")
}

fn default_worker_resources() -> ResourceRequirements {
    resources("100m", "256Mi", "512Mi")
}

fn resources(cpu: &str, memory_request: &str, memory_limit: &str) -> ResourceRequirements {
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    ResourceRequirements {
        requests: Some(
            [
                ("cpu".to_owned(), Quantity(cpu.to_owned())),
                ("memory".to_owned(), Quantity(memory_request.to_owned())),
            ]
            .into(),
        ),
        limits: Some([("memory".to_owned(), Quantity(memory_limit.to_owned()))].into()),
        ..ResourceRequirements::default()
    }
}

impl Default for ApiSpec {
    fn default() -> Self {
        Self {
            replicas: default_api_replicas(),
            port: default_api_port(),
            resources: default_api_resources(),
            service: ServiceSpec::default(),
            autoscaling: None,
            trusted_proxy_header: None,
            rate_limit: None,
            cors_allowed_origins: Vec::new(),
            request_timeout_ms: None,
            shutdown_delay_ms: default_shutdown_delay_ms(),
        }
    }
}

/// The API Service.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    /// Service type.
    #[serde(default, rename = "type")]
    pub type_: ServiceType,
    /// Port the Service exposes; it forwards to `spec.api.port`.
    #[serde(default = "default_service_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
}

fn default_service_port() -> i32 {
    80
}

impl Default for ServiceSpec {
    fn default() -> Self {
        Self {
            type_: ServiceType::default(),
            port: default_service_port(),
        }
    }
}

/// Kubernetes Service type.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ServiceType {
    /// Reachable inside the cluster only.
    #[default]
    ClusterIP,
    /// Also exposed on every node's port.
    NodePort,
    /// Also exposed through a cloud load balancer.
    LoadBalancer,
}

impl ServiceType {
    /// The Kubernetes spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClusterIP => "ClusterIP",
            Self::NodePort => "NodePort",
            Self::LoadBalancer => "LoadBalancer",
        }
    }
}

/// Horizontal pod autoscaling on CPU utilisation (autoscaling/v2).
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.minReplicas <= self.maxReplicas").message("autoscaling.minReplicas must not exceed autoscaling.maxReplicas"))]
pub struct AutoscalingSpec {
    /// Lowest replica count the HPA may choose.
    #[serde(default = "default_min_replicas")]
    #[schemars(range(min = 1, max = 100))]
    pub min_replicas: i32,
    /// Highest replica count the HPA may choose.
    #[schemars(range(min = 1, max = 100))]
    pub max_replicas: i32,
    /// Average CPU utilisation (percent of the CPU request) the HPA aims for.
    #[serde(default = "default_target_cpu")]
    #[schemars(range(min = 1, max = 100))]
    pub target_cpu_utilization_percentage: i32,
}

fn default_min_replicas() -> i32 {
    2
}

fn default_target_cpu() -> i32 {
    75
}

/// The worker Deployment.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkerSpec {
    /// Number of worker pods when autoscaling is off; `0` runs no worker Deployment pods.
    #[serde(default = "default_worker_replicas")]
    #[schemars(range(min = 0, max = 100))]
    pub replicas: i32,
    /// How often an idle worker polls the queue (`worker --poll-interval-ms`).
    #[serde(default = "default_poll_interval_ms")]
    #[schemars(range(min = 10, max = 60000))]
    pub poll_interval_ms: i32,
    /// Jobs one worker pod runs at once (`worker --concurrency`; the app
    /// accepts 1 to 100,000: a waiting step holds no connection, so slow LLM
    /// steps can run by the thousand, bounded by the pod's memory).
    #[serde(default = "default_concurrency")]
    #[schemars(range(min = 1, max = 100000))]
    pub concurrency: i32,
    /// Port of the worker's own probes and metrics (`worker --health-port`).
    #[serde(default = "default_health_port")]
    #[schemars(range(min = 1024, max = 65535))]
    pub health_port: i32,
    /// CPU and memory requests and limits of the worker container.
    #[serde(default = "default_worker_resources")]
    pub resources: ResourceRequirements,
    /// Horizontal pod autoscaling; when set, an HPA owns the replica count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingSpec>,
}

fn default_worker_replicas() -> i32 {
    1
}

fn default_poll_interval_ms() -> i32 {
    500
}

fn default_concurrency() -> i32 {
    4
}

fn default_health_port() -> i32 {
    9091
}

impl Default for WorkerSpec {
    fn default() -> Self {
        Self {
            replicas: default_worker_replicas(),
            poll_interval_ms: default_poll_interval_ms(),
            concurrency: default_concurrency(),
            health_port: default_health_port(),
            resources: default_worker_resources(),
            autoscaling: None,
        }
    }
}

/// Database migrations.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct MigrationsSpec {
    /// Run `vm-webapp migrate` as a Job before a new image rolls out.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Retries of the migration pod before the Job counts as failed.
    #[serde(default = "default_backoff_limit")]
    #[schemars(range(min = 0, max = 10))]
    pub backoff_limit: i32,
    /// Deadline of the whole Job in seconds.
    #[serde(default = "default_active_deadline")]
    #[schemars(range(min = 30, max = 86400))]
    pub active_deadline_seconds: i64,
    /// Secret key holding the schema owner's database URL, injected into the migration Job
    /// only, as `VM_MIGRATION_DB_URL`: migrations run DDL as that role, so the runtime's
    /// own URL (`spec.database`) can belong to a role without DDL rights. Unset: the Job
    /// migrates with `spec.database`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<SecretKeyRef>,
    /// PostgreSQL role of the runtime (the user in `spec.database`), passed to the
    /// migration Job only as `VM_RUNTIME_DB_ROLE`: `migrate` grants it exactly the
    /// runtime's rights (read and write data, append-only audit, no DDL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z0-9_]+$')").message("spec.migrations.runtimeRole must be a role name of letters, digits and _"))]
    #[schemars(length(min = 1, max = 63))]
    pub runtime_role: Option<String>,
}

fn default_true() -> bool {
    true
}

fn default_backoff_limit() -> i32 {
    2
}

fn default_active_deadline() -> i64 {
    600
}

impl Default for MigrationsSpec {
    fn default() -> Self {
        Self {
            enabled: default_true(),
            backoff_limit: default_backoff_limit(),
            active_deadline_seconds: default_active_deadline(),
            database: None,
            runtime_role: None,
        }
    }
}

/// Scheduled backups: a CronJob runs `vm-webapp backup --output-dir <mount> --keep
/// <retention>` with the image the Deployments serve and the migration credentials
/// (`spec.migrations.database`, else `spec.database`), writing
/// `vm-webapp-backup-<UTC time>.jsonl` files to the claim.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct BackupSpec {
    /// Cron schedule in UTC, five fields (`minute hour day-of-month month day-of-week`,
    /// with `*`, lists, ranges and steps) or `@hourly`, `@daily`, `@weekly`, `@monthly`.
    /// The longest gap between two scheduled times plus `activeDeadlineSeconds` is how old
    /// the last successful backup may get before `VmWebappBackupStale` fires.
    #[schemars(length(min = 1, max = 128))]
    pub schedule: String,
    /// Complete backup files kept on the claim, newest first; older ones are deleted after
    /// each successful backup.
    #[serde(default = "default_backup_retention")]
    #[schemars(range(min = 1, max = 1000))]
    pub retention: i32,
    /// Name of an existing PersistentVolumeClaim in the namespace the backups are written
    /// to (ReadWriteOnce is enough: one backup runs at a time).
    #[schemars(length(min = 1, max = 253))]
    pub claim_name: String,
    /// Deadline of one backup Job in seconds.
    #[serde(default = "default_backup_deadline")]
    #[schemars(range(min = 60, max = 86400))]
    pub active_deadline_seconds: i64,
    /// Stop scheduling new backups (running ones finish).
    #[serde(default)]
    pub suspend: bool,
}

fn default_backup_retention() -> i32 {
    7
}

fn default_backup_deadline() -> i64 {
    3600
}

/// An extra environment variable: a literal value or a Secret key, exactly one of them.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.value) != has(self.secretKeyRef)").message("set exactly one of value and secretKeyRef"))]
pub struct ExtraEnvVar {
    /// Variable name.
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z_][A-Za-z0-9_]*$')").message("env name must be a C identifier"))]
    #[schemars(length(min = 1, max = 128))]
    pub name: String,
    /// Literal value (goes into the ConfigMap; do not put secrets here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// Secret key whose value becomes the variable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_key_ref: Option<SecretKeyRef>,
}

/// Observed state, written only by the operator.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VmWebappStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Progressing` and `Degraded`, each with a reason and a message.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Ready pods of the API Deployment.
    #[serde(default)]
    pub api_ready_replicas: i32,
    /// Ready pods of the worker Deployment.
    #[serde(default)]
    pub worker_ready_replicas: i32,
    /// The image the API Deployment actually runs (may lag `spec.image` during a migration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving_image: Option<String>,
    /// Scheduled backups, when `spec.backup` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupStatus>,
}

/// What the operator knows of the scheduled backups (from the CronJob's status).
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct BackupStatus {
    /// The CronJob that runs them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron_job: Option<String>,
    /// When the last backup Job succeeded (RFC 3339), from the CronJob's
    /// `status.lastSuccessfulTime`; unset until one has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_successful_time: Option<String>,
    /// When the CronJob was created (RFC 3339): before the first success, backups count as
    /// stale once this is older than `maxAgeSeconds`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub configured_time: Option<String>,
    /// When the CronJob last started a backup Job (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_schedule_time: Option<String>,
    /// How old the last successful backup may get before it counts as stale, in seconds:
    /// the longest gap of `spec.backup.schedule` plus the Job's deadline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age_seconds: Option<i64>,
}

impl VmWebappSpec {
    /// Every Secret key this spec references, in a stable order (database, Redis, LLM
    /// API key, API keys, webhook secrets, migration database, then `env` entries). All of
    /// them feed the config hash and the missing-Secret check.
    pub fn secret_refs(&self) -> Vec<&SecretKeyRef> {
        let fixed = [
            &self.database,
            &self.redis,
            &self.llm.api_key,
            &self.auth.api_keys,
            &self.webhooks.secrets,
            &self.migrations.database,
        ];
        fixed
            .into_iter()
            .flatten()
            .chain(self.env.iter().filter_map(|e| e.secret_key_ref.as_ref()))
            .collect()
    }

    /// Whether this spec references the ConfigMap called `name` (not counting the one the
    /// operator owns).
    pub fn references_config_map(&self, name: &str) -> bool {
        self.plans.as_ref().is_some_and(|p| p.name == name)
    }

    /// Whether this spec references the Secret called `name`.
    pub fn references_secret(&self, name: &str) -> bool {
        self.secret_refs().iter().any(|r| r.name == name)
    }
}
