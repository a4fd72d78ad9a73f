//! Names shared by the builders, the controller, the status logic and the tests: the field
//! manager, labels and annotations, condition types and reasons, and the app's contract
//! (command, probe paths, mount points). Changing one of these is a contract change.

/// Field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "vm-operator";

/// Field manager that keeps a Deployment's `spec.replicas` when autoscaling is turned on, so
/// that dropping the field from the operator's apply does not reset it to 1 before the HPA
/// takes over (Kubernetes "transferring ownership" for server-side apply).
pub const REPLICAS_HANDOVER_MANAGER: &str = "vm-operator-replicas-handover";

/// Name the operator reports itself as in events.
pub const CONTROLLER_NAME: &str = "vm-operator";

/// `app.kubernetes.io/name` of every child.
pub const APP_NAME: &str = "vm-webapp";
/// `app.kubernetes.io/part-of` of every child.
pub const PART_OF: &str = "vmwebapp";

/// Recommended label keys.
pub mod labels {
    /// The application's name.
    pub const NAME: &str = "app.kubernetes.io/name";
    /// The `VmWebapp` the object belongs to.
    pub const INSTANCE: &str = "app.kubernetes.io/instance";
    /// `api`, `worker`, `migration` or `config`.
    pub const COMPONENT: &str = "app.kubernetes.io/component";
    /// Always the operator.
    pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
    /// The larger application.
    pub const PART_OF: &str = "app.kubernetes.io/part-of";
}

/// Annotation keys the operator writes.
pub mod annotations {
    /// On pod templates: SHA-256 of the ConfigMap data and the referenced Secret keys' data,
    /// so that a change to either rolls the pods.
    pub const CONFIG_HASH: &str = "webapp.vm.dev/config-hash";
    /// On a migration Job: the image it migrates to.
    pub const MIGRATION_IMAGE: &str = "webapp.vm.dev/migration-image";
    /// On a migration Job: the `VmWebapp` generation that created it (a failed Job is
    /// retried once the generation moves on).
    pub const MIGRATION_GENERATION: &str = "webapp.vm.dev/generation";
    /// On every child: SHA-256 of the object as the operator applies it (without this
    /// annotation). A reconcile skips the write when the live child carries the same hash
    /// and still contains every desired field, so a steady state makes no writes while a
    /// spec change or a hand edit is applied (and corrected) at once.
    pub const APPLIED_HASH: &str = "webapp.vm.dev/applied-hash";
}

/// Component label values.
pub mod component {
    /// The HTTP API.
    pub const API: &str = "api";
    /// The background worker.
    pub const WORKER: &str = "worker";
    /// The database migration Job.
    pub const MIGRATION: &str = "migration";
    /// The scheduled backup CronJob and its Jobs.
    pub const BACKUP: &str = "backup";
    /// Shared objects (ConfigMap, ServiceAccount).
    pub const CONFIG: &str = "config";
}

/// Condition types of `VmWebapp.status.conditions`.
pub mod condition {
    /// All children exist, are up to date and available.
    pub const READY: &str = "Ready";
    /// A rollout or migration is under way.
    pub const PROGRESSING: &str = "Progressing";
    /// Something needs a person: a missing Secret, a failed migration, an invalid spec, a
    /// write the API server refused, or an API server that keeps failing.
    pub const DEGRADED: &str = "Degraded";
}

/// Condition reasons (CamelCase, stable: alerts and runbooks match on them).
pub mod reason {
    /// Everything is available at the desired version.
    pub const AVAILABLE: &str = "Available";
    /// Deployments are rolling out.
    pub const ROLLING_OUT: &str = "RollingOut";
    /// The migration Job for a new image is running.
    pub const MIGRATION_RUNNING: &str = "MigrationRunning";
    /// The migration Job for a new image failed; the old image keeps serving.
    pub const MIGRATION_FAILED: &str = "MigrationFailed";
    /// A referenced Secret or key does not exist.
    pub const SECRET_MISSING: &str = "SecretMissing";
    /// `Degraded`: the plans ConfigMap (`spec.plans`) or its key does not exist.
    pub const CONFIG_MAP_MISSING: &str = "ConfigMapMissing";
    /// The spec cannot be turned into objects.
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// `spec.suspend` is true.
    pub const SUSPENDED: &str = "Suspended";
    /// Nothing to report.
    pub const AS_EXPECTED: &str = "AsExpected";
    /// Everything is in place and nothing is moving.
    pub const RECONCILED: &str = "Reconciled";
    /// The API server refused a write of a child (a 4xx answer: quota, admission webhook or
    /// policy, LimitRange, validation); the message names the child and carries the
    /// server's message.
    pub const APPLY_FAILED: &str = "ApplyFailed";
    /// Several passes in a row failed on transport errors or 5xx/429 answers; the operator
    /// keeps retrying with backoff.
    pub const API_ERRORS: &str = "ApiErrors";
}

/// The app's side of the contract.
pub mod app {
    /// The executable inside the image.
    pub const COMMAND: &str = "vm-webapp";
    /// Liveness probe path.
    pub const LIVE_PATH: &str = "/api/v2/health/live";
    /// Readiness probe path.
    pub const READY_PATH: &str = "/api/v2/health/ready";
    /// `timeoutSeconds` of every rendered HTTP probe.
    pub const PROBE_TIMEOUT_SECONDS: i32 = 2;
    /// How long the app's readiness checks may take in total (`READY_CHECK_BUDGET` in the
    /// app's `http/health.rs`). At most half of [`PROBE_TIMEOUT_SECONDS`], so the kubelet
    /// receives the 503 with its reason instead of recording a probe timeout; the contract
    /// test ties the two.
    pub const READY_CHECK_BUDGET_MS: i64 = 1_000;
    /// `VM_WORKSPACE_ROOT` inside containers (an emptyDir).
    pub const WORKSPACE_ROOT: &str = "/var/data/vm";
    /// Where the backup PersistentVolumeClaim is mounted in backup pods
    /// (`backup --output-dir`).
    pub const BACKUP_DIR: &str = "/var/backups/vm";
    /// Where the plans ConfigMap key (`spec.plans`) is mounted, read-only, in API and worker
    /// pods.
    pub const PLANS_DIR: &str = "/etc/vm-webapp/plans";
    /// `VM_PLANS_FILE` in API and worker pods: the mounted key under [`PLANS_DIR`].
    pub const PLANS_FILE: &str = "/etc/vm-webapp/plans/plans.yaml";
    /// Writable scratch directory (an emptyDir), since the root filesystem is read-only.
    pub const TMP_DIR: &str = "/tmp";
    /// Name of the API container port.
    pub const HTTP_PORT_NAME: &str = "http";
    /// Name of the worker's health port.
    pub const HEALTH_PORT_NAME: &str = "health";
    /// Non-root user and group the containers run as.
    pub const RUN_AS_USER: i64 = 10001;
    /// The app's `VM_REQUEST_TIMEOUT_MS` default: the longest an in-flight request runs
    /// after SIGTERM unless `spec.api.requestTimeoutMs` says otherwise.
    pub const DEFAULT_REQUEST_TIMEOUT_MS: i64 = 30_000;
    /// The variable bounding how long claimed jobs may run after SIGTERM; settable through
    /// `spec.env`, so the termination grace periods read it from there.
    pub const SHUTDOWN_GRACE_VAR: &str = "VM_SHUTDOWN_GRACE_MS";
    /// The app's `VM_SHUTDOWN_GRACE_MS` default.
    pub const DEFAULT_SHUTDOWN_GRACE_MS: i64 = 20_000;
    /// The variable bounding how long a live-update stream's write may wait for a client
    /// that stopped reading (the last write of a stream ended at SIGTERM included); settable
    /// through `spec.env`.
    pub const STREAM_WRITE_TIMEOUT_VAR: &str = "VM_STREAM_WRITE_TIMEOUT_MS";
    /// The app's `VM_STREAM_WRITE_TIMEOUT_MS` default.
    pub const DEFAULT_STREAM_WRITE_TIMEOUT_MS: i64 = 30_000;
}
