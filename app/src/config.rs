//! Typed settings, read once from the environment and validated before anything
//! else happens.
//!
//! Every variable the runtime understands is parsed here (see `.env.example` for
//! the full list). Parsing collects *every* problem instead of stopping at the
//! first, so `vm-webapp check-config` can show an operator the whole picture in
//! one go. Error messages name the variable and what was expected; they never
//! repeat a value, because several variables carry credentials.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// File name of the embedded SQLite database under the workspace root.
pub const EMBEDDED_DB_FILE: &str = "vmwebapp.db";

/// Every variable the settings read. A variable whose name is close to one of
/// these but not equal is most likely a typo that would silently leave the
/// setting at its default (`VM_API_KEY` leaves the API open): see
/// [`misspelled_variables`].
pub const KNOWN_VARIABLES: &[&str] = &[
    "APP_ENV",
    "VM_ENABLE_MANAGED_MODE",
    "VM_DB_URL",
    "VM_REDIS_URL",
    "VM_WORKSPACE_ROOT",
    "KIMI_MODEL",
    "KIMI_BASE_URL",
    "KIMI_API_KEY",
    "VM_LLM_TIMEOUT_MS",
    "LOG_LEVEL",
    "LOG_FORMAT",
    "PORT",
    "VM_JOB_MAX_ATTEMPTS",
    "VM_JOB_LEASE_MS",
    "VM_JOB_BACKOFF_BASE_MS",
    "VM_JOB_BACKOFF_MAX_MS",
    "VM_SHUTDOWN_GRACE_MS",
    "VM_WORKER_STALE_MS",
    "VM_MAX_BODY_BYTES",
    "VM_SHUTDOWN_DELAY_MS",
    "VM_API_KEYS",
    "VM_WEBHOOK_SECRETS",
    "VM_WEBHOOK_ALLOWED_CIDRS",
    "VM_TRUSTED_PROXY_HEADER",
    "VM_RATE_LIMIT_KEY_RPS",
    "VM_RATE_LIMIT_KEY_BURST",
    "VM_RATE_LIMIT_IP_RPS",
    "VM_RATE_LIMIT_IP_BURST",
    "VM_CORS_ALLOWED_ORIGINS",
    "VM_REQUEST_TIMEOUT_MS",
    "VM_MIGRATION_DB_URL",
    "VM_RUNTIME_DB_ROLE",
    "VM_WEBHOOK_TOLERANCE_SECONDS",
    "VM_PLANS_FILE",
    "VM_METRICS_TENANT_LABELS",
    "VM_STREAM_HEARTBEAT_MS",
    "VM_STREAM_POLL_MS",
    "VM_STREAM_GAP_TIMEOUT_MS",
    "VM_STREAM_BUFFER",
    "VM_STREAM_MAX_SUBSCRIBERS",
    "VM_STREAM_MAX_PER_KEY",
    "VM_STREAM_WRITE_TIMEOUT_MS",
];

/// The names among `names` that are not settings but within two edits of
/// one, each with the setting it probably means. Only names are compared and
/// returned, never values. Names farther from every setting (other programs'
/// variables, Kubernetes service variables) are left alone.
pub fn misspelled_variables<I, S>(names: I) -> Vec<(String, &'static str)>
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let mut found = Vec::new();
    for name in names {
        let name = name.as_ref();
        if name.len() < 5 || KNOWN_VARIABLES.contains(&name) {
            continue;
        }
        let upper = name.to_ascii_uppercase();
        let closest = KNOWN_VARIABLES
            .iter()
            .map(|known| (strsim::levenshtein(&upper, known), *known))
            .min();
        if let Some((distance, known)) = closest
            && distance <= 2
        {
            found.push((name.to_string(), known));
        }
    }
    found.sort();
    found
}

/// A value that must never be printed: `Debug` and `Display` redact it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret value itself, for the one place that needs to use it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(\"<redacted>\")")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Deployment environment (`APP_ENV`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppEnv {
    /// A developer machine: embedded SQLite and in-process worker by default.
    Local,
    /// A pre-production cluster.
    Staging,
    /// Production.
    Production,
}

impl AppEnv {
    /// The value as written in `APP_ENV`.
    pub fn as_str(self) -> &'static str {
        match self {
            AppEnv::Local => "local",
            AppEnv::Staging => "staging",
            AppEnv::Production => "production",
        }
    }
}

/// Log output format (`LOG_FORMAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line, for log collectors.
    Json,
    /// Human-readable lines, for terminals.
    Pretty,
}

/// Which relational database backs the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbBackend {
    /// SQLite, embedded or at an explicit path.
    Sqlite,
    /// PostgreSQL.
    Postgres,
}

impl DbBackend {
    /// The backend a connection URL points at, if it is one we support.
    pub fn of_url(url: &str) -> Option<Self> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Some(DbBackend::Postgres)
        } else if url.starts_with("sqlite:") {
            Some(DbBackend::Sqlite)
        } else {
            None
        }
    }

    /// Short name used in logs and `check-config` output.
    pub fn as_str(self) -> &'static str {
        match self {
            DbBackend::Sqlite => "sqlite",
            DbBackend::Postgres => "postgres",
        }
    }
}

/// Where the database lives.
#[derive(Debug, Clone)]
pub struct DatabaseSettings {
    /// Connection URL. Secret: it may carry a password.
    pub url: Secret,
    /// The backend the URL points at.
    pub backend: DbBackend,
    /// True when `VM_DB_URL` was unset and the embedded SQLite file is used.
    pub embedded: bool,
}

/// The LLM endpoint used by `llm` steps (OpenAI-compatible chat completions).
#[derive(Debug, Clone)]
pub struct LlmSettings {
    /// Model name sent in each request (`KIMI_MODEL`).
    pub model: String,
    /// Base URL; requests go to `{base_url}/chat/completions` (`KIMI_BASE_URL`).
    pub base_url: String,
    /// Bearer token (`KIMI_API_KEY`).
    pub api_key: Option<Secret>,
    /// Upper bound on one call (`VM_LLM_TIMEOUT_MS`).
    pub timeout: Duration,
}

/// How the LLM step will behave with these settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LlmMode {
    /// Calls the configured endpoint.
    Remote,
    /// Local mode without a key: a built-in deterministic model answers.
    Offline,
    /// Outside local mode without a key: runs with `llm` steps are refused.
    Unavailable,
}

/// Queue and worker tuning.
#[derive(Debug, Clone)]
pub struct QueueSettings {
    /// Deliveries of one step before it is dead-lettered (`VM_JOB_MAX_ATTEMPTS`).
    pub max_attempts: u32,
    /// How long a claim is held before another worker may take the job (`VM_JOB_LEASE_MS`).
    pub lease: Duration,
    /// First retry delay; doubles each attempt (`VM_JOB_BACKOFF_BASE_MS`).
    pub backoff_base: Duration,
    /// Ceiling of the retry delay (`VM_JOB_BACKOFF_MAX_MS`).
    pub backoff_max: Duration,
    /// How long in-flight jobs may run after SIGTERM (`VM_SHUTDOWN_GRACE_MS`).
    pub shutdown_grace: Duration,
    /// A worker whose last heartbeat (or loop pass) is older than this counts as
    /// stalled in readiness (`VM_WORKER_STALE_MS`).
    pub worker_stale_after: Duration,
}

/// Live updates (`GET /api/v2/…/events/stream`).
#[derive(Debug, Clone)]
pub struct StreamSettings {
    /// A comment line on an idle stream this often, so proxies keep it open
    /// (`VM_STREAM_HEARTBEAT_MS`, default 15 s).
    pub heartbeat: Duration,
    /// How often each process reads new events from the database when
    /// nothing nudges it (`VM_STREAM_POLL_MS`, default 500 ms); a commit in
    /// this process, or a Redis message from another, polls at once.
    pub poll_interval: Duration,
    /// How long a missing event id holds later events back before it is
    /// taken for one that will never commit (`VM_STREAM_GAP_TIMEOUT_MS`,
    /// default 5 s; see `stream::highwater`).
    pub gap_timeout: Duration,
    /// Events buffered per live subscriber: bounds a stream's memory (with
    /// one catch-up page) and sets how far behind it falls before it
    /// continues from the database on the same stream (`VM_STREAM_BUFFER`,
    /// default 256).
    pub buffer: usize,
    /// Open streams a process serves at most; more answer
    /// `503 too_many_streams` (`VM_STREAM_MAX_SUBSCRIBERS`, default 1000).
    pub max_subscribers: usize,
    /// Open streams one API key (or the open mode's caller) holds at most in
    /// a process, so one tenant cannot take every stream; more answer
    /// `503 too_many_streams` (`VM_STREAM_MAX_PER_KEY`, default 100).
    pub max_per_key: usize,
    /// A write to a stream's client (an event or a heartbeat) that makes no
    /// progress for this long ends the stream and frees its place under the
    /// limits, counted as `stalled` (`VM_STREAM_WRITE_TIMEOUT_MS`, default
    /// 30 s; see `http::conn`).
    pub write_timeout: Duration,
}

/// One API key: only its SHA-256 is kept after start-up.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey {
    /// Identifies the actor in logs and the audit trail (never the key).
    pub id: String,
    /// SHA-256 of the key.
    pub hash: [u8; 32],
    /// Role `admin`: reads the audit trail, changes plans, exports usage, and
    /// may do everything an `approver` may.
    pub admin: bool,
    /// Role `approver`: may approve or reject approval steps.
    pub approver: bool,
    /// The tenant that owns what this key creates: `tenant=NAME` in the
    /// entry (`tenant=webhook/SOURCE` is [`webhook_tenant`]`(SOURCE)`), else
    /// the key's own id (a key without a tenant is its own tenant).
    pub tenant: String,
}

impl ApiKey {
    /// Whether this key may decide approval steps (`approver` or `admin`).
    pub fn may_approve(&self) -> bool {
        self.admin || self.approver
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKey")
            .field("id", &self.id)
            .field("admin", &self.admin)
            .field("approver", &self.approver)
            .field("tenant", &self.tenant)
            .finish_non_exhaustive()
    }
}

/// A signing secret of one webhook source; a source may have several during rotation.
#[derive(Debug, Clone)]
pub struct WebhookSecret {
    /// The `{source}` of `POST /api/v2/webhooks/{source}`.
    pub source: String,
    /// HMAC-SHA256 key.
    pub secret: Secret,
}

/// A token bucket: `per_second` refill, `burst` capacity; 0 disables.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Tokens added per second.
    pub per_second: f64,
    /// Bucket capacity.
    pub burst: u32,
}

impl RateLimit {
    /// Whether this limit applies at all.
    pub fn enabled(&self) -> bool {
        self.per_second > 0.0 && self.burst > 0
    }
}

/// Authentication, webhooks, rate limits and HTTP hardening.
#[derive(Debug, Clone)]
pub struct SecuritySettings {
    /// `VM_API_KEYS`: `id:key[:roles][:tenant=NAME]`, comma-separated, roles
    /// `admin` and `approver` joined by `+`. Empty: open (local only).
    pub api_keys: Vec<ApiKey>,
    /// `VM_WEBHOOK_SECRETS`: `source:secret`, comma-separated; repeat a source to rotate.
    pub webhook_secrets: Vec<WebhookSecret>,
    /// `VM_WEBHOOK_TOLERANCE_SECONDS`: accepted clock skew and replay window.
    pub webhook_tolerance: Duration,
    /// `VM_WEBHOOK_ALLOWED_CIDRS`: webhook senders allowed; empty allows any.
    pub webhook_allowed: Vec<ipnet::IpNet>,
    /// `VM_TRUSTED_PROXY_HEADER`: take the client address from this header
    /// (its last entry, the one the trusted proxy added) instead of the peer.
    pub trusted_proxy_header: Option<String>,
    /// `VM_RATE_LIMIT_KEY_RPS` / `VM_RATE_LIMIT_KEY_BURST`.
    pub rate_per_key: RateLimit,
    /// `VM_RATE_LIMIT_IP_RPS` / `VM_RATE_LIMIT_IP_BURST`.
    pub rate_per_ip: RateLimit,
    /// `VM_CORS_ALLOWED_ORIGINS`: empty means no CORS headers at all.
    pub cors_origins: Vec<String>,
    /// `VM_REQUEST_TIMEOUT_MS` (ms, 100 to 600,000, default 30,000): the
    /// longest a request may take before `408 request_timeout`. A run
    /// creation or cancellation is committed before that answer or not at
    /// all: one that has begun to commit is answered with its outcome
    /// instead, and on PostgreSQL its statements wait for locks at most the
    /// time left less a tenth of this (at most 1 s), then answer 503
    /// `dependency_unavailable` ([`crate::deadline`]).
    pub request_timeout: Duration,
    /// `VM_MIGRATION_DB_URL`: the schema owner's URL for `migrate` (falls back to `VM_DB_URL`).
    pub migration_db_url: Option<Secret>,
    /// `VM_RUNTIME_DB_ROLE`: role that `migrate` grants the runtime's rights to.
    pub runtime_db_role: Option<String>,
}

/// Everything the runtime reads from its environment.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `APP_ENV`.
    pub app_env: AppEnv,
    /// `VM_ENABLE_MANAGED_MODE`: PostgreSQL and Redis required, worker runs separately.
    pub managed_mode: bool,
    /// `VM_DB_URL`, or the embedded SQLite file.
    pub database: DatabaseSettings,
    /// `VM_REDIS_URL`.
    pub redis_url: Option<Secret>,
    /// `VM_WORKSPACE_ROOT`.
    pub workspace_root: PathBuf,
    /// `KIMI_*` and `VM_LLM_TIMEOUT_MS`.
    pub llm: LlmSettings,
    /// `LOG_LEVEL`: a tracing filter directive such as `info` or `vm_webapp=debug`.
    pub log_level: String,
    /// `LOG_FORMAT`.
    pub log_format: LogFormat,
    /// `PORT`: default for `serve --port`.
    pub port: u16,
    /// Queue tuning.
    pub queue: QueueSettings,
    /// `VM_MAX_BODY_BYTES`: largest accepted request body.
    pub max_body_bytes: usize,
    /// Authentication, webhooks, rate limits and HTTP hardening.
    pub security: SecuritySettings,
    /// Live updates.
    pub stream: StreamSettings,
    /// `VM_SHUTDOWN_DELAY_MS`: after SIGTERM, how long to keep answering
    /// (`not_ready`) before closing the listener, so that endpoints are
    /// updated before connections are refused.
    pub shutdown_delay: Duration,
    /// `VM_PLANS_FILE`: the validated plans file; `None` (unset) means no
    /// limits, while usage is still metered.
    pub plans: Option<std::sync::Arc<crate::plans::Plans>>,
    /// `VM_PLANS_FILE` as given, for the summary.
    pub plans_file: Option<PathBuf>,
    /// `VM_METRICS_TENANT_LABELS`: usage gauges per tenant (a `tenant`
    /// label) instead of summed over tenants. Off by default: one series per
    /// tenant and meter is unbounded cardinality.
    pub metrics_tenant_labels: bool,
}

/// One problem with one variable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{variable}: {problem}")]
pub struct ConfigError {
    /// The variable at fault.
    pub variable: &'static str,
    /// What is wrong and what was expected. Never contains the value.
    pub problem: String,
}

/// Every problem found in one pass over the environment.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    /// True when some error concerns `variable`.
    pub fn mentions(&self, variable: &str) -> bool {
        self.0.iter().any(|e| e.variable == variable)
    }
}

/// Collects errors while parsing.
struct Parser<F> {
    lookup: F,
    errors: Vec<ConfigError>,
}

impl<F: Fn(&str) -> Option<String>> Parser<F> {
    /// A variable's value, with surrounding whitespace removed; empty counts as unset.
    fn get(&self, name: &str) -> Option<String> {
        (self.lookup)(name)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    }

    fn fail(&mut self, variable: &'static str, problem: impl Into<String>) {
        self.errors.push(ConfigError {
            variable,
            problem: problem.into(),
        });
    }

    fn bool(&mut self, name: &'static str, default: bool) -> bool {
        match self.get(name).map(|v| v.to_ascii_lowercase()) {
            None => default,
            Some(v) => match v.as_str() {
                "true" | "1" | "yes" | "on" => true,
                "false" | "0" | "no" | "off" => false,
                _ => {
                    self.fail(name, "expected true or false");
                    default
                }
            },
        }
    }

    fn number<T>(&mut self, name: &'static str, default: T, min: T, max: T) -> T
    where
        T: std::str::FromStr + PartialOrd + fmt::Display + Copy,
    {
        let Some(raw) = self.get(name) else {
            return default;
        };
        match raw.parse::<T>() {
            Ok(v) if v >= min && v <= max => v,
            _ => {
                self.fail(name, format!("expected a whole number from {min} to {max}"));
                default
            }
        }
    }

    fn millis(&mut self, name: &'static str, default_ms: u64, min: u64, max: u64) -> Duration {
        Duration::from_millis(self.number(name, default_ms, min, max))
    }
}

impl Settings {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigErrors> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads settings through `lookup`, so tests (and the operator's contract
    /// test) can feed a map instead of the process environment.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigErrors> {
        let mut p = Parser {
            lookup,
            errors: Vec::new(),
        };

        let app_env = match p.get("APP_ENV").map(|v| v.to_ascii_lowercase()).as_deref() {
            None | Some("local") => AppEnv::Local,
            Some("staging") => AppEnv::Staging,
            Some("production") => AppEnv::Production,
            Some(_) => {
                p.fail("APP_ENV", "expected one of local, staging, production");
                AppEnv::Local
            }
        };
        let managed_mode = p.bool("VM_ENABLE_MANAGED_MODE", false);

        let workspace_root = PathBuf::from(
            p.get("VM_WORKSPACE_ROOT")
                .unwrap_or_else(|| "./var/vm".to_string()),
        );

        let database = parse_database(&mut p, app_env, managed_mode, &workspace_root);

        let redis_url = p.get("VM_REDIS_URL");
        if let Some(url) = &redis_url {
            if let Err(problem) = check_redis_url(url) {
                p.fail("VM_REDIS_URL", problem);
            }
        } else if managed_mode {
            p.fail(
                "VM_REDIS_URL",
                "required when VM_ENABLE_MANAGED_MODE is true (a redis:// URL)",
            );
        }

        let llm = LlmSettings {
            model: p.get("KIMI_MODEL").unwrap_or_else(|| "kimi-k2".to_string()),
            base_url: p
                .get("KIMI_BASE_URL")
                .unwrap_or_else(|| "https://api.moonshot.ai/v1".to_string())
                .trim_end_matches('/')
                .to_string(),
            api_key: p.get("KIMI_API_KEY").map(Secret::new),
            timeout: p.millis("VM_LLM_TIMEOUT_MS", 60_000, 100, 600_000),
        };
        match reqwest::Url::parse(&llm.base_url) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.has_host() => {}
            _ => p.fail("KIMI_BASE_URL", "expected an http:// or https:// URL"),
        }
        if let Some(key) = &llm.api_key
            && !usable_in_header(key.expose())
        {
            p.fail(
                "KIMI_API_KEY",
                "contains spaces or other characters an HTTP header cannot carry (expected the key as issued)",
            );
        }

        let log_level = match p.get("LOG_LEVEL") {
            None => "info".to_string(),
            Some(raw) => match log_filter(&raw) {
                Ok(filter) => filter,
                Err(problem) => {
                    p.fail("LOG_LEVEL", problem);
                    "info".to_string()
                }
            },
        };
        let log_format = match p
            .get("LOG_FORMAT")
            .map(|v| v.to_ascii_lowercase())
            .as_deref()
        {
            None if app_env == AppEnv::Local => LogFormat::Pretty,
            None => LogFormat::Json,
            Some("json") => LogFormat::Json,
            Some("pretty") | Some("text") => LogFormat::Pretty,
            Some(_) => {
                p.fail("LOG_FORMAT", "expected json or pretty");
                LogFormat::Json
            }
        };
        let port = p.number("PORT", 8000u16, 1, u16::MAX);

        let queue = QueueSettings {
            max_attempts: p.number("VM_JOB_MAX_ATTEMPTS", 5u32, 1, 100),
            lease: p.millis("VM_JOB_LEASE_MS", 30_000, 200, 3_600_000),
            backoff_base: p.millis("VM_JOB_BACKOFF_BASE_MS", 1_000, 1, 3_600_000),
            backoff_max: p.millis("VM_JOB_BACKOFF_MAX_MS", 300_000, 1, 86_400_000),
            shutdown_grace: p.millis("VM_SHUTDOWN_GRACE_MS", 20_000, 0, 3_600_000),
            worker_stale_after: p.millis("VM_WORKER_STALE_MS", 60_000, 6_000, 3_600_000),
        };
        if queue.backoff_max < queue.backoff_base {
            p.fail(
                "VM_JOB_BACKOFF_MAX_MS",
                "must be at least VM_JOB_BACKOFF_BASE_MS",
            );
        }
        let max_body_bytes = p.number("VM_MAX_BODY_BYTES", 1_048_576usize, 1_024, 64 << 20);
        let shutdown_delay = p.millis("VM_SHUTDOWN_DELAY_MS", 0, 0, 120_000);
        let security = parse_security(&mut p, app_env);
        let plans_file = p.get("VM_PLANS_FILE").map(PathBuf::from);
        let plans = match &plans_file {
            None => None,
            Some(path) => match crate::plans::Plans::load(path) {
                Ok(plans) => Some(std::sync::Arc::new(plans)),
                Err(problems) => {
                    for problem in problems {
                        p.fail("VM_PLANS_FILE", problem);
                    }
                    None
                }
            },
        };
        let metrics_tenant_labels = p.bool("VM_METRICS_TENANT_LABELS", false);
        let stream = StreamSettings {
            heartbeat: p.millis("VM_STREAM_HEARTBEAT_MS", 15_000, 10, 300_000),
            poll_interval: p.millis("VM_STREAM_POLL_MS", 500, 10, 60_000),
            gap_timeout: p.millis("VM_STREAM_GAP_TIMEOUT_MS", 5_000, 10, 600_000),
            buffer: p.number("VM_STREAM_BUFFER", 256usize, 1, 100_000),
            max_subscribers: p.number("VM_STREAM_MAX_SUBSCRIBERS", 1_000usize, 1, 1_000_000),
            max_per_key: p.number("VM_STREAM_MAX_PER_KEY", 100usize, 1, 1_000_000),
            write_timeout: p.millis("VM_STREAM_WRITE_TIMEOUT_MS", 30_000, 100, 600_000),
        };

        if !p.errors.is_empty() {
            return Err(ConfigErrors(p.errors));
        }
        Ok(Settings {
            app_env,
            managed_mode,
            database,
            redis_url: redis_url.map(Secret::new),
            workspace_root,
            llm,
            log_level,
            log_format,
            port,
            queue,
            max_body_bytes,
            shutdown_delay,
            security,
            plans,
            plans_file,
            metrics_tenant_labels,
            stream,
        })
    }

    /// The database `migrate` applies DDL to: the schema owner's
    /// `VM_MIGRATION_DB_URL` when given, else `VM_DB_URL`.
    pub fn migration_database(&self) -> DatabaseSettings {
        match &self.security.migration_db_url {
            Some(url) => DatabaseSettings {
                url: url.clone(),
                // Validated at parse time; PostgreSQL is the only backend with roles.
                backend: DbBackend::of_url(url.expose()).unwrap_or(DbBackend::Postgres),
                embedded: false,
            },
            None => self.database.clone(),
        }
    }

    /// How `llm` steps will be served.
    pub fn llm_mode(&self) -> LlmMode {
        match (&self.llm.api_key, self.app_env) {
            (Some(_), _) => LlmMode::Remote,
            (None, AppEnv::Local) => LlmMode::Offline,
            (None, _) => LlmMode::Unavailable,
        }
    }

    /// Whether `serve` also runs the worker in its own process: in local mode
    /// (one command is a whole system), unless managed mode is on. In staging
    /// and production the worker is its own Deployment, so API pods never
    /// compete with it for jobs.
    pub fn embedded_worker(&self) -> bool {
        self.app_env == AppEnv::Local && !self.managed_mode
    }

    /// A non-secret summary, one `key: value` per line, for `check-config`.
    pub fn summary(&self) -> String {
        let llm = match self.llm_mode() {
            LlmMode::Remote => format!("remote ({} at {})", self.llm.model, self.llm.base_url),
            LlmMode::Offline => "offline built-in model (KIMI_API_KEY not set)".to_string(),
            LlmMode::Unavailable => "unavailable (KIMI_API_KEY not set)".to_string(),
        };
        let database = if self.database.embedded {
            format!("embedded sqlite under {}", self.workspace_root.display())
        } else {
            self.database.backend.as_str().to_string()
        };
        [
            format!("app_env: {}", self.app_env.as_str()),
            format!("managed_mode: {}", self.managed_mode),
            format!("database: {database}"),
            format!(
                "redis: {}",
                if self.redis_url.is_some() {
                    "configured"
                } else {
                    "disabled"
                }
            ),
            format!("llm: {llm}"),
            format!("workspace_root: {}", self.workspace_root.display()),
            format!("embedded_worker: {}", self.embedded_worker()),
            format!(
                "log: {} ({})",
                self.log_level,
                match self.log_format {
                    LogFormat::Json => "json",
                    LogFormat::Pretty => "pretty",
                }
            ),
            format!(
                "plans: {}",
                match (&self.plans, &self.plans_file) {
                    (Some(plans), Some(file)) => format!(
                        "{} plan(s) from {}, default {}",
                        plans.plans.len(),
                        file.display(),
                        plans.default_plan
                    ),
                    _ => "none (VM_PLANS_FILE not set: no limits, usage is still metered)".into(),
                }
            ),
            format!(
                "api_keys: {}",
                if self.security.api_keys.is_empty() {
                    "none (the API is open)".to_string()
                } else {
                    let ids: Vec<&str> = self
                        .security
                        .api_keys
                        .iter()
                        .map(|k| k.id.as_str())
                        .collect();
                    ids.join(", ")
                }
            ),
        ]
        .join("\n")
    }
}

/// The non-empty, trimmed entries of a comma-separated list, numbered from 1
/// (error messages name an entry by its position, never by its text).
fn entries(value: Option<String>) -> Vec<(usize, String)> {
    value
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(str::to_string)
        .enumerate()
        .map(|(i, e)| (i + 1, e))
        .collect()
}

/// Whether `value` can be sent as (part of) an HTTP header value as it is:
/// visible ASCII only, so a key never fails later, at the first request.
fn usable_in_header(value: &str) -> bool {
    value.bytes().all(|b| b.is_ascii_graphic())
}

/// Checks a database URL without ever repeating it (it may carry a password).
fn check_database_url(url: &str) -> Result<DbBackend, String> {
    let backend = DbBackend::of_url(url)
        .ok_or_else(|| "expected a postgres:// or sqlite:// URL".to_string())?;
    if backend == DbBackend::Postgres {
        match reqwest::Url::parse(url) {
            // A socket directory may come as `?host=/path` instead of a host.
            Ok(parsed) if parsed.has_host() || parsed.query_pairs().any(|(k, _)| k == "host") => {}
            // The parser's own words name the part at fault, never the value.
            Ok(_) => {
                return Err(
                    "expected postgres://user:password@host:5432/database (the host is missing)"
                        .into(),
                );
            }
            Err(e) => {
                return Err(format!(
                    "not a valid postgres:// URL ({e}); check the host and port, and percent-encode special characters of the user name and password"
                ));
            }
        }
    }
    if backend == DbBackend::Sqlite && sqlite_in_memory(url) {
        return Err(
            "an in-memory SQLite database is not supported: each of the store's connections would open its own empty database, and every run would be gone at exit; give a file, e.g. sqlite://var/vm/vm.db?mode=rwc"
                .into(),
        );
    }
    if backend == DbBackend::Sqlite && sqlite_query(url).any(|(k, v)| k == "mode" && v == "ro") {
        return Err(
            "mode=ro opens the database read-only, but the app writes to it (runs, events, leases); use mode=rwc or mode=rw"
                .into(),
        );
    }
    // The driver's own parser, so that what it would refuse at start-up
    // (an unknown sslmode, mode or query parameter) is reported here; its
    // words name the parameter and value at fault, never the password
    // (checked below all the same).
    use std::str::FromStr as _;
    let parsed = match backend {
        DbBackend::Postgres => sqlx::postgres::PgConnectOptions::from_str(url).map(drop),
        DbBackend::Sqlite => sqlx::sqlite::SqliteConnectOptions::from_str(url).map(drop),
    };
    if let Err(e) = parsed {
        let text = e.to_string();
        let mut reason = text.as_str();
        while let Some(inner) = reason.strip_prefix("error with configuration: ") {
            reason = inner;
        }
        return Err(if repeats_a_secret(url, reason) {
            "the database driver refuses this URL; check its query parameters".to_string()
        } else {
            format!("the database driver refuses this URL: {reason}")
        });
    }
    Ok(backend)
}

/// The query parameters of an SQLite URL, as written.
fn sqlite_query(url: &str) -> impl Iterator<Item = (&str, &str)> {
    url.split_once('?')
        .map_or("", |(_, q)| q)
        .split('&')
        .filter_map(|p| p.split_once('='))
}

/// Whether `message` repeats the password (raw or percent-decoded) or the
/// whole of `url`: a message that does must not be shown.
fn repeats_a_secret(url: &str, message: &str) -> bool {
    if message.contains(url) {
        return true;
    }
    let Ok(parsed) = reqwest::Url::parse(url) else {
        return false;
    };
    let Some(password) = parsed.password().filter(|p| !p.is_empty()) else {
        return false;
    };
    let decoded = percent_encoding::percent_decode_str(password).decode_utf8_lossy();
    message.contains(password) || message.contains(decoded.as_ref())
}

/// Whether an SQLite URL names an in-memory database (`sqlite::memory:`,
/// `sqlite://:memory:`, or `mode=memory` in its query, as sqlx reads them).
fn sqlite_in_memory(url: &str) -> bool {
    let path = url.split_once('?').map_or(url, |(path, _)| path);
    let path = path.trim_start_matches("sqlite:").trim_start_matches("//");
    path == ":memory:"
        || sqlite_query(url)
            .any(|(k, v)| k.eq_ignore_ascii_case("mode") && v.eq_ignore_ascii_case("memory"))
}

/// Checks a Redis URL without ever repeating it (it may carry a password).
fn check_redis_url(url: &str) -> Result<(), String> {
    const EXPECTED: &str = "expected a redis://, rediss:// or unix:// URL";
    let parsed = reqwest::Url::parse(url).map_err(|e| {
        if url.contains("://") {
            format!(
                "not a valid URL ({e}); check the host and port, and percent-encode special characters of the password"
            )
        } else {
            EXPECTED.to_string()
        }
    })?;
    match parsed.scheme() {
        "redis" | "rediss" if parsed.has_host() => {
            // The client's own parser: a database that is not a number
            // (`/notanumber`) is refused there, at the first connection.
            // Its words never repeat the URL.
            redis::IntoConnectionInfo::into_connection_info(url)
                .map(drop)
                .map_err(|e| {
                    let reason = e.to_string();
                    let reason = if repeats_a_secret(url, &reason) {
                        "invalid"
                    } else {
                        reason.as_str()
                    };
                    format!(
                        "the Redis client refuses this URL ({reason}); expected redis://[:password@]host[:port][/db] with a numeric db"
                    )
                })
        }
        "redis" | "rediss" => {
            Err("expected redis://[:password@]host[:port][/db] (the host is missing)".into())
        }
        "unix" | "redis+unix" => Ok(()),
        _ => Err(EXPECTED.to_string()),
    }
}

/// The log filter `LOG_LEVEL` asks for, or what is wrong with it.
///
/// Each comma-separated directive is a level (`error`, `warn`, `info`,
/// `debug`, `trace`, `off`) or `target=level`. A bare word that is not a
/// level is refused: the filter library would read it as a target name and
/// silence everything else. Without a bare level, `info` applies to every
/// target not named, so a mistyped target never silences the process.
pub fn log_filter(value: &str) -> Result<String, String> {
    use std::str::FromStr;
    use tracing_subscriber::filter::{Directive, LevelFilter};
    const EXPECTED: &str = "expected a level (error, warn, info, debug, trace, off) or target=level directives, comma-separated";
    let directives: Vec<&str> = value
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect();
    let mut has_default = false;
    for directive in &directives {
        // Not a secret: the directive is repeated so the typo is easy to find.
        let shown: String = directive.chars().take(64).collect();
        match directive.rsplit_once('=') {
            None if LevelFilter::from_str(directive).is_ok() => has_default = true,
            None => {
                return Err(format!("`{shown}` is not a level; {EXPECTED}"));
            }
            Some((target, level)) => {
                if target.is_empty() || LevelFilter::from_str(level).is_err() {
                    return Err(format!("`{shown}` does not end in =level; {EXPECTED}"));
                }
            }
        }
        if Directive::from_str(directive).is_err() {
            return Err(format!("`{shown}` does not parse; {EXPECTED}"));
        }
    }
    if directives.is_empty() {
        return Err(EXPECTED.to_string());
    }
    let filter = directives.join(",");
    Ok(if has_default {
        filter
    } else {
        format!("info,{filter}")
    })
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// `tenant=webhook/SOURCE` in a `VM_API_KEYS` entry: the key's tenant is
/// [`webhook_tenant`]`(SOURCE)`.
const WEBHOOK_TENANT_FIELD: &str = "webhook/";

/// The tenant that owns the runs webhook deliveries from `source` start.
/// It holds a `:`, which no key id or plain tenant name can, so only a key
/// configured with `tenant=webhook/SOURCE` (or an admin) reaches those runs.
pub fn webhook_tenant(source: &str) -> String {
    format!("webhook:{source}")
}

/// Actor names the app itself uses, so no API key may take them as its id:
/// a key's decisions would pass for deadline expiries (`system`), or a key
/// without `tenant=` would own the open mode's and pre-tenant runs
/// (`anonymous`).
const RESERVED_KEY_IDS: [&str; 3] = ["system", "anonymous", "unknown"];

/// What follows `id:key` in a `VM_API_KEYS` entry.
struct KeyOptions {
    admin: bool,
    approver: bool,
    tenant: Option<String>,
}

/// Reads the optional fields after `id:key`: at most one roles field
/// (`admin`, `approver`, or both joined by `+`) and at most one
/// `tenant=NAME` (1 to 64 letters, digits, `-` or `_`, or `webhook/SOURCE`),
/// in either order.
/// Reports each mistake against `VM_API_KEYS` and returns `None` on any.
fn parse_key_options<F: Fn(&str) -> Option<String>>(
    p: &mut Parser<F>,
    i: usize,
    id: &str,
    fields: &[&str],
) -> Option<KeyOptions> {
    let mut out = KeyOptions {
        admin: false,
        approver: false,
        tenant: None,
    };
    let mut roles_seen = false;
    // `tenant=webhook:SOURCE`, the way the tenant is written everywhere else,
    // splits into `tenant=webhook` and a field `SOURCE`: say how to write it.
    let mut after_webhook = false;
    for field in fields {
        let hint = if after_webhook {
            "; a webhook source's tenant is written tenant=webhook/SOURCE (`:` separates the fields of an entry)"
        } else {
            ""
        };
        after_webhook = *field == "tenant=webhook";
        if let Some(tenant) = field.strip_prefix("tenant=") {
            if out.tenant.is_some() {
                p.fail(
                    "VM_API_KEYS",
                    format!("entry {i} (id `{id}`): `tenant=` appears twice"),
                );
                return None;
            }
            // `webhook/SOURCE` names the tenant of the runs webhook
            // deliveries from SOURCE start (`webhook:SOURCE`; `:` separates
            // the entry's fields), so that a non-admin key may see and
            // decide them.
            let named = match tenant.strip_prefix(WEBHOOK_TENANT_FIELD) {
                Some(source) if valid_name(source) => Some(webhook_tenant(source)),
                Some(_) => None,
                None => valid_name(tenant).then(|| tenant.to_string()),
            };
            let Some(named) = named else {
                p.fail(
                    "VM_API_KEYS",
                    format!(
                        "entry {i} (id `{id}`): the tenant must be 1 to 64 letters, digits, - or _, or webhook/SOURCE for the runs of a webhook source"
                    ),
                );
                return None;
            };
            out.tenant = Some(named);
            continue;
        }
        if roles_seen {
            p.fail(
                "VM_API_KEYS",
                format!(
                    "entry {i} (id `{id}`): expected id:key[:roles][:tenant=NAME], but there is more than one roles field{hint}"
                ),
            );
            return None;
        }
        roles_seen = true;
        for role in field.split('+') {
            match role {
                "admin" => out.admin = true,
                "approver" => out.approver = true,
                // Never repeat the field itself: it may be a mistyped key.
                _ => {
                    p.fail(
                        "VM_API_KEYS",
                        format!(
                            "entry {i} (id `{id}`): the roles field must be `admin`, `approver` or `admin+approver`{hint}"
                        ),
                    );
                    return None;
                }
            }
        }
    }
    Some(out)
}

fn parse_security<F: Fn(&str) -> Option<String>>(
    p: &mut Parser<F>,
    app_env: AppEnv,
) -> SecuritySettings {
    use sha2::Digest;
    let mut api_keys: Vec<ApiKey> = Vec::new();
    // Ids of the keys whose entry names a tenant.
    let mut explicit_tenants: Vec<String> = Vec::new();
    // The entry number of each key in `api_keys`, for messages.
    let mut key_entries: Vec<usize> = Vec::new();
    for (i, entry) in entries(p.get("VM_API_KEYS")) {
        // Until an entry parses as `id:key`, nothing of it is repeated: a
        // value without its `id:` is the key itself.
        let Some((id, rest)) = entry.split_once(':') else {
            p.fail(
                "VM_API_KEYS",
                format!("entry {i}: expected id:key[:roles][:tenant=NAME], but the entry has no `:` (is the id missing?)"),
            );
            continue;
        };
        if !valid_name(id) {
            p.fail(
                "VM_API_KEYS",
                format!("entry {i}: expected id:key[:roles][:tenant=NAME] with an id of 1 to 64 letters, digits, - or _"),
            );
            continue;
        }
        if RESERVED_KEY_IDS.contains(&id) {
            p.fail(
                "VM_API_KEYS",
                format!(
                    "entry {i}: the id `{id}` is reserved (`system` decides approvals at their deadline, `anonymous` is the open mode's caller and the tenant of runs from before tenants, `unknown` the actor of failed authentications); choose another id"
                ),
            );
            continue;
        }
        let mut fields = rest.split(':');
        let key = fields.next().unwrap_or_default();
        let options: Vec<&str> = fields.collect();
        if key.is_empty() {
            p.fail(
                "VM_API_KEYS",
                format!("entry {i}: expected id:key[:roles][:tenant=NAME], but the key is empty"),
            );
            continue;
        }
        if key.len() < 16 {
            p.fail(
                "VM_API_KEYS",
                format!("entry {i} (id `{id}`): the key must be at least 16 characters"),
            );
            continue;
        }
        if !usable_in_header(key) {
            p.fail(
                "VM_API_KEYS",
                format!(
                    "entry {i} (id `{id}`): the key may hold only visible ASCII characters (it is sent in a header)"
                ),
            );
            continue;
        }
        let Some(options) = parse_key_options(p, i, id, &options) else {
            continue;
        };
        if options.tenant.is_some() {
            explicit_tenants.push(id.to_string());
        }
        if api_keys.iter().any(|k| k.id == id) {
            p.fail(
                "VM_API_KEYS",
                format!("entry {i} (id `{id}`): the id appears twice"),
            );
        }
        let hash: [u8; 32] = sha2::Sha256::digest(key.as_bytes()).into();
        // A shared key authenticates as one entry only, with its roles and
        // tenant: the other entry would silently act as it.
        if let Some((j, other)) = key_entries
            .iter()
            .zip(&api_keys)
            .find(|(_, k)| k.hash == hash)
        {
            p.fail(
                "VM_API_KEYS",
                format!(
                    "entry {i} (id `{id}`): the key is the same as entry {j}'s (id `{}`); each entry needs its own key",
                    other.id
                ),
            );
        }
        key_entries.push(i);
        api_keys.push(ApiKey {
            id: id.to_string(),
            hash,
            admin: options.admin,
            approver: options.approver,
            tenant: options.tenant.unwrap_or_else(|| id.to_string()),
        });
    }
    // A key without `tenant=` is its own tenant, named by its id: that name
    // must not silently be another key's tenant (it would see that tenant's
    // runs).
    for key in &api_keys {
        let implicit = !explicit_tenants.contains(&key.id);
        let named_elsewhere = api_keys
            .iter()
            .any(|other| other.id != key.id && other.tenant == key.id);
        if implicit && named_elsewhere {
            p.fail(
                "VM_API_KEYS",
                format!(
                    "id `{}` has no tenant= and is also another key's tenant: add tenant={} to join that tenant, or choose another id",
                    key.id, key.id
                ),
            );
        }
    }
    if api_keys.is_empty() && app_env == AppEnv::Production {
        p.fail(
            "VM_API_KEYS",
            "required when APP_ENV is production (id:key[:roles][:tenant=NAME], comma-separated)",
        );
    }
    let mut webhook_secrets = Vec::new();
    for (i, entry) in entries(p.get("VM_WEBHOOK_SECRETS")) {
        let Some((source, secret)) = entry.split_once(':') else {
            p.fail(
                "VM_WEBHOOK_SECRETS",
                format!("entry {i}: expected source:secret, but the entry has no `:` (is the source missing?)"),
            );
            continue;
        };
        if !valid_name(source) {
            p.fail(
                "VM_WEBHOOK_SECRETS",
                format!("entry {i}: expected source:secret with a source of 1 to 64 letters, digits, - or _"),
            );
            continue;
        }
        if secret.len() < 16 {
            p.fail(
                "VM_WEBHOOK_SECRETS",
                format!("entry {i} (source `{source}`): the secret must be at least 16 characters"),
            );
            continue;
        }
        webhook_secrets.push(WebhookSecret {
            source: source.to_string(),
            secret: Secret::new(secret),
        });
    }
    let mut webhook_allowed = Vec::new();
    for cidr in p
        .get("VM_WEBHOOK_ALLOWED_CIDRS")
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
    {
        match cidr
            .parse::<ipnet::IpNet>()
            .or_else(|_| cidr.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        {
            Ok(net) => webhook_allowed.push(net),
            Err(_) => p.fail(
                "VM_WEBHOOK_ALLOWED_CIDRS",
                format!(
                    "`{}` is not an address or CIDR block",
                    cidr.chars().take(64).collect::<String>()
                ),
            ),
        }
    }
    let trusted_proxy_header = p
        .get("VM_TRUSTED_PROXY_HEADER")
        .map(|h| h.to_ascii_lowercase());
    if let Some(h) = &trusted_proxy_header
        && axum::http::HeaderName::from_bytes(h.as_bytes()).is_err()
    {
        p.fail(
            "VM_TRUSTED_PROXY_HEADER",
            "expected a header name such as x-forwarded-for",
        );
    }
    let rate =
        |p: &mut Parser<F>, rps: &'static str, burst: &'static str, d_rps: u32, d_burst: u32| {
            RateLimit {
                per_second: f64::from(p.number(rps, d_rps, 0, 100_000)),
                burst: p.number(burst, d_burst, 0, 1_000_000),
            }
        };
    let rate_per_key = rate(
        p,
        "VM_RATE_LIMIT_KEY_RPS",
        "VM_RATE_LIMIT_KEY_BURST",
        20,
        40,
    );
    let rate_per_ip = rate(p, "VM_RATE_LIMIT_IP_RPS", "VM_RATE_LIMIT_IP_BURST", 50, 100);
    let cors_origins: Vec<String> = p
        .get("VM_CORS_ALLOWED_ORIGINS")
        .unwrap_or_default()
        .split(',')
        .map(|o| o.trim().trim_end_matches('/').to_string())
        .filter(|o| !o.is_empty())
        .collect();
    for origin in &cors_origins {
        let ok = reqwest::Url::parse(origin)
            .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.has_host());
        if !ok || axum::http::HeaderValue::from_str(origin).is_err() {
            p.fail(
                "VM_CORS_ALLOWED_ORIGINS",
                "expected origins such as https://app.example.com, comma-separated",
            );
            break;
        }
    }
    let request_timeout = p.millis("VM_REQUEST_TIMEOUT_MS", 30_000, 100, 600_000);
    let migration_db_url = p.get("VM_MIGRATION_DB_URL");
    if let Some(url) = &migration_db_url
        && let Err(problem) = check_database_url(url)
    {
        p.fail("VM_MIGRATION_DB_URL", problem);
    }
    let runtime_db_role = p.get("VM_RUNTIME_DB_ROLE");
    if let Some(role) = &runtime_db_role
        && (role.len() > 63 || !role.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
    {
        p.fail(
            "VM_RUNTIME_DB_ROLE",
            "expected a role name of letters, digits and _",
        );
    }
    SecuritySettings {
        api_keys,
        webhook_secrets,
        webhook_tolerance: Duration::from_secs(p.number(
            "VM_WEBHOOK_TOLERANCE_SECONDS",
            300u64,
            1,
            86_400,
        )),
        webhook_allowed,
        trusted_proxy_header,
        rate_per_key,
        rate_per_ip,
        cors_origins,
        request_timeout,
        migration_db_url: migration_db_url.map(Secret::new),
        runtime_db_role,
    }
}

fn parse_database<F: Fn(&str) -> Option<String>>(
    p: &mut Parser<F>,
    app_env: AppEnv,
    managed_mode: bool,
    workspace_root: &Path,
) -> DatabaseSettings {
    let embedded = || DatabaseSettings {
        url: Secret::new(format!(
            "sqlite://{}?mode=rwc",
            workspace_root.join(EMBEDDED_DB_FILE).display()
        )),
        backend: DbBackend::Sqlite,
        embedded: true,
    };
    let Some(url) = p.get("VM_DB_URL") else {
        if managed_mode {
            p.fail(
                "VM_DB_URL",
                "required when VM_ENABLE_MANAGED_MODE is true (a postgres:// URL)",
            );
        } else if app_env != AppEnv::Local {
            p.fail(
                "VM_DB_URL",
                "required when APP_ENV is staging or production (only local mode embeds SQLite)",
            );
        }
        return embedded();
    };
    let backend = match check_database_url(&url) {
        Ok(backend) => backend,
        Err(problem) => {
            p.fail("VM_DB_URL", problem);
            return embedded();
        }
    };
    if managed_mode && backend != DbBackend::Postgres {
        p.fail(
            "VM_DB_URL",
            "managed mode needs PostgreSQL (a postgres:// URL), not SQLite",
        );
    }
    DatabaseSettings {
        url: Secret::new(url),
        backend,
        embedded: false,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn parse(vars: &[(&str, &str)]) -> Result<Settings, ConfigErrors> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Settings::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn an_empty_environment_is_a_working_local_setup() {
        let s = parse(&[]).expect("defaults are valid");
        assert_eq!(s.app_env, AppEnv::Local);
        assert!(s.database.embedded);
        assert_eq!(s.database.backend, DbBackend::Sqlite);
        assert!(s.database.url.expose().contains("var/vm/vmwebapp.db"));
        assert_eq!(s.log_format, LogFormat::Pretty);
        assert_eq!(s.llm_mode(), LlmMode::Offline);
        assert_eq!(s.port, 8000);
        assert!(s.embedded_worker());
    }

    #[test]
    fn managed_mode_without_database_and_redis_names_both_variables() {
        let err = parse(&[("VM_ENABLE_MANAGED_MODE", "true")]).unwrap_err();
        assert!(
            err.mentions("VM_DB_URL") && err.mentions("VM_REDIS_URL"),
            "{err}"
        );
    }

    /// What the drivers would refuse at start-up is refused by the settings
    /// (and `check-config`) with the driver's reason, and never with the
    /// password in it.
    #[test]
    fn urls_the_drivers_refuse_are_refused_with_their_reason_and_no_secret() {
        let cases = [
            (
                "VM_DB_URL",
                "postgres://u:s3cr3t-pw@db/app?sslmode=bogus",
                "bogus",
            ),
            ("VM_DB_URL", "sqlite://x.db?mode=bogus", "bogus"),
            ("VM_DB_URL", "sqlite://x.db?colour=blue", "colour"),
            ("VM_DB_URL", "sqlite://x.db?mode=ro", "read-only"),
            (
                "VM_REDIS_URL",
                "redis://:s3cr3t-pw@r:6379/notanumber",
                "numeric db",
            ),
        ];
        for (name, url, reason) in cases {
            let err = parse(&[(name, url)]).unwrap_err();
            let text = err.to_string();
            assert!(err.mentions(name) && text.contains(reason), "{url}: {text}");
            assert!(!text.contains("s3cr3t"), "{url}: {text}");
        }
        for (name, url) in [
            ("VM_DB_URL", "postgres://u:p@db/app?sslmode=require"),
            ("VM_DB_URL", "sqlite://x.db?mode=rw&cache=shared"),
            ("VM_REDIS_URL", "redis://:p@r:6379/2"),
        ] {
            parse(&[(name, url)]).unwrap_or_else(|e| panic!("{url}: {e}"));
        }
        assert!(repeats_a_secret(
            "postgres://u:a%40b@db/x",
            "password a@b is wrong"
        ));
    }

    #[test]
    fn an_in_memory_sqlite_database_is_refused_with_a_reason() {
        for url in [
            "sqlite::memory:",
            "sqlite://:memory:",
            "sqlite://x.db?mode=memory",
            "sqlite://x.db?cache=shared&mode=memory",
        ] {
            let err = parse(&[("VM_DB_URL", url)]).unwrap_err();
            assert!(
                err.mentions("VM_DB_URL") && err.to_string().contains("in-memory"),
                "{url}: {err}"
            );
        }
        for url in [
            "sqlite://x.db?mode=rwc",
            "sqlite://memory.db",
            "sqlite:x.db",
        ] {
            parse(&[("VM_DB_URL", url)]).unwrap_or_else(|e| panic!("{url}: {e}"));
        }
    }

    #[test]
    fn managed_mode_refuses_sqlite() {
        let err = parse(&[
            ("VM_ENABLE_MANAGED_MODE", "true"),
            ("VM_DB_URL", "sqlite://x.db"),
            ("VM_REDIS_URL", "redis://r:6379"),
        ])
        .unwrap_err();
        assert!(err.mentions("VM_DB_URL"));
        let ok = parse(&[
            ("VM_ENABLE_MANAGED_MODE", "true"),
            ("VM_DB_URL", "postgres://u:p@db/app"),
            ("VM_REDIS_URL", "redis://r:6379"),
            ("APP_ENV", "production"),
            ("VM_API_KEYS", "ops:0123456789abcdef0123:admin"),
        ])
        .expect("valid managed settings");
        assert!(!ok.embedded_worker());
        assert_eq!(ok.log_format, LogFormat::Json);
        assert_eq!(ok.llm_mode(), LlmMode::Unavailable);
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let err = parse(&[
            ("APP_ENV", "prod"),
            ("PORT", "http"),
            ("LOG_FORMAT", "xml"),
            ("KIMI_BASE_URL", "ftp://x"),
            ("VM_JOB_MAX_ATTEMPTS", "0"),
            ("VM_ENABLE_MANAGED_MODE", "maybe"),
        ])
        .unwrap_err();
        for var in [
            "APP_ENV",
            "PORT",
            "LOG_FORMAT",
            "KIMI_BASE_URL",
            "VM_JOB_MAX_ATTEMPTS",
            "VM_ENABLE_MANAGED_MODE",
        ] {
            assert!(err.mentions(var), "{var} missing from {err}");
        }
    }

    #[test]
    fn errors_and_debug_output_never_contain_secret_values() {
        let err = parse(&[
            ("VM_DB_URL", "mysql://admin:hunter2@db/app"),
            ("VM_REDIS_URL", "http://:redispw@r"),
            ("APP_ENV", "staging"),
        ])
        .unwrap_err();
        let text = format!("{err} {err:?}");
        assert!(
            !text.contains("hunter2") && !text.contains("redispw"),
            "{text}"
        );
        let ok = parse(&[
            ("VM_DB_URL", "postgres://admin:hunter2@db/app"),
            ("KIMI_API_KEY", "sk-live-123"),
        ])
        .expect("valid");
        let debug = format!("{ok:?} {}", ok.summary());
        assert!(
            !debug.contains("hunter2") && !debug.contains("sk-live-123"),
            "{debug}"
        );
    }

    #[test]
    fn api_keys_are_parsed_hashed_and_required_in_production() {
        let s = parse(&[(
            "VM_API_KEYS",
            "ci:ci-key-0123456789abcdef, ops:ops-key-0123456789abcdef:admin",
        )])
        .expect("valid");
        let keys = &s.security.api_keys;
        assert_eq!(
            keys.iter()
                .map(|k| (k.id.as_str(), k.admin))
                .collect::<Vec<_>>(),
            [("ci", false), ("ops", true)]
        );
        assert!(
            !format!("{s:?}").contains("ci-key-0123456789abcdef"),
            "only hashes are kept"
        );
        let err = parse(&[(
            "VM_API_KEYS",
            "ci:short,ci:ci-key-0123456789abcdef,bad id:x,ops:ops-key-0123456789abcdef:root",
        )])
        .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("entry 1 (id `ci`): the key must be at least 16")
                && text.contains("entry 4 (id `ops`): the roles field must be `admin`, `approver` or `admin+approver`")
                && text.contains("entry 3:"),
            "{text}"
        );
        assert!(!text.contains("ops-key-0123456789abcdef"), "{text}");
        let err = parse(&[
            ("APP_ENV", "production"),
            ("VM_DB_URL", "postgres://db/app"),
        ])
        .unwrap_err();
        assert!(err.mentions("VM_API_KEYS"));
    }

    /// Runs a webhook starts belong to `webhook:<source>`, a name no plain
    /// `tenant=` can spell: without `tenant=webhook/<source>` only an admin
    /// could decide their approval steps.
    #[test]
    fn a_key_may_name_a_webhook_sources_tenant() {
        let s = parse(&[(
            "VM_API_KEYS",
            "gh:gh-key-0123456789abcdef:approver:tenant=webhook/github, \
             webhook:wh-key-0123456789abcdef:tenant=webhook",
        )])
        .expect("valid");
        let tenants: Vec<_> = s
            .security
            .api_keys
            .iter()
            .map(|k| (k.id.as_str(), k.tenant.as_str()))
            .collect();
        // A plain tenant called `webhook` is still a plain tenant.
        assert_eq!(tenants, [("gh", "webhook:github"), ("webhook", "webhook")]);
        assert_eq!(webhook_tenant("github"), "webhook:github");
    }

    #[test]
    fn api_key_roles_and_tenants_are_parsed_in_either_order() {
        let s = parse(&[(
            "VM_API_KEYS",
            "a:a-key-0123456789abcdef:approver:tenant=acme, \
             b:b-key-0123456789abcdef:tenant=acme:admin+approver, \
             c:c-key-0123456789abcdef:admin, d:d-key-0123456789abcdef",
        )])
        .expect("valid");
        let keys: Vec<_> = s
            .security
            .api_keys
            .iter()
            .map(|k| {
                (
                    k.id.as_str(),
                    k.admin,
                    k.approver,
                    k.may_approve(),
                    k.tenant.as_str(),
                )
            })
            .collect();
        assert_eq!(
            keys,
            [
                ("a", false, true, true, "acme"),
                ("b", true, true, true, "acme"),
                // An admin may approve; a key without a tenant is its own tenant.
                ("c", true, false, true, "c"),
                ("d", false, false, false, "d"),
            ]
        );
        for (entry, expected) in [
            ("e:e-key-0123456789abcdef:root", "the roles field must be"),
            (
                "e:e-key-0123456789abcdef:admin:approver",
                "more than one roles field",
            ),
            (
                "e:e-key-0123456789abcdef:tenant=a:tenant=b",
                "`tenant=` appears twice",
            ),
            (
                "e:e-key-0123456789abcdef:tenant=",
                "the tenant must be 1 to 64",
            ),
            (
                "e:e-key-0123456789abcdef:tenant=a b",
                "the tenant must be 1 to 64",
            ),
            (
                "e:e-key-0123456789abcdef:tenant=webhook/",
                "or webhook/SOURCE",
            ),
            (
                "e:e-key-0123456789abcdef:tenant=webhook/a/b",
                "or webhook/SOURCE",
            ),
            // The tenant's own spelling, `webhook:github`: `:` splits it, and
            // the error used to speak only of roles.
            (
                "e:e-key-0123456789abcdef:approver:tenant=webhook:github",
                "written tenant=webhook/SOURCE",
            ),
            (
                "e:e-key-0123456789abcdef:tenant=webhook:github",
                "written tenant=webhook/SOURCE",
            ),
        ] {
            let text = parse(&[("VM_API_KEYS", entry)]).unwrap_err().to_string();
            assert!(text.contains(expected), "{entry}: {text}");
            assert!(!text.contains("e-key-0123456789abcdef"), "{text}");
        }
    }

    #[test]
    fn webhook_and_hardening_settings_are_validated() {
        let s = parse(&[
            (
                "VM_WEBHOOK_SECRETS",
                "github:gh-secret-0123456789,github:gh-secret-next-012345",
            ),
            ("VM_WEBHOOK_ALLOWED_CIDRS", "10.0.0.0/8, 192.168.1.7"),
            ("VM_CORS_ALLOWED_ORIGINS", "https://app.example.com/"),
        ])
        .expect("valid");
        assert_eq!(s.security.webhook_secrets.len(), 2);
        assert_eq!(s.security.webhook_allowed.len(), 2);
        assert_eq!(s.security.cors_origins, ["https://app.example.com"]);
        let err = parse(&[
            ("VM_WEBHOOK_SECRETS", "github:short"),
            ("VM_WEBHOOK_ALLOWED_CIDRS", "10.0.0.0/33"),
            ("VM_CORS_ALLOWED_ORIGINS", "*"),
            ("VM_RUNTIME_DB_ROLE", "vm; DROP TABLE runs"),
        ])
        .unwrap_err();
        for var in [
            "VM_WEBHOOK_SECRETS",
            "VM_WEBHOOK_ALLOWED_CIDRS",
            "VM_CORS_ALLOWED_ORIGINS",
            "VM_RUNTIME_DB_ROLE",
        ] {
            assert!(err.mentions(var), "{var} missing from {err}");
        }
        assert!(!err.to_string().contains("short"), "secrets are not echoed");
    }

    /// Every secret-bearing setting, fed malformed values that carry a
    /// secret-looking part. Without this, a message that quotes "the bad
    /// entry" would print the very credential the user meant to protect.
    #[test]
    fn errors_about_secret_bearing_settings_never_repeat_any_part_of_the_value() {
        const SECRET: &str = "Zq7wSecretPartNeverShown";
        let cases: Vec<(&str, String)> = vec![
            ("VM_API_KEYS", SECRET.to_string()),
            ("VM_API_KEYS", format!("{SECRET}:")),
            ("VM_API_KEYS", format!("bad id {SECRET}:{SECRET}")),
            ("VM_API_KEYS", format!("ok:{SECRET}:{SECRET}")),
            ("VM_API_KEYS", format!("ok:{SECRET} {SECRET}")),
            ("VM_API_KEYS", format!("ci:{}", &SECRET[..8])),
            ("VM_WEBHOOK_SECRETS", SECRET.to_string()),
            ("VM_WEBHOOK_SECRETS", format!("bad source:{SECRET}")),
            ("VM_WEBHOOK_SECRETS", format!("gh:{}", &SECRET[..8])),
            ("VM_DB_URL", format!("mysql://u:{SECRET}@db/app")),
            ("VM_DB_URL", format!("postgres://u:{SECRET}@db:port/app")),
            ("VM_DB_URL", SECRET.to_string()),
            ("VM_MIGRATION_DB_URL", format!("mysql://u:{SECRET}@db/app")),
            (
                "VM_MIGRATION_DB_URL",
                format!("postgres://u:{SECRET}@[::1/app"),
            ),
            ("VM_REDIS_URL", format!("http://:{SECRET}@r:6379")),
            ("VM_REDIS_URL", format!("redis://:{SECRET}@r:port")),
            ("VM_REDIS_URL", SECRET.to_string()),
            ("KIMI_API_KEY", format!("{SECRET} {SECRET}")),
        ];
        for (variable, value) in cases {
            let err = parse(&[(variable, value.as_str()), ("APP_ENV", "staging")])
                .expect_err(&format!("{variable} accepted a malformed value"));
            assert!(err.mentions(variable), "{variable}: {err}");
            let text = format!("{err} {err:?}");
            // No 6-character window of the secret part may appear.
            for start in 0..=SECRET.len() - 6 {
                let window = &SECRET[start..start + 6];
                assert!(
                    !text.contains(window),
                    "{variable} leaks {window:?}: {text}"
                );
            }
        }
    }

    #[test]
    fn an_api_key_entry_without_an_id_is_diagnosed_as_missing_its_id() {
        let err = parse(&[("VM_API_KEYS", "averyveryverylongsecretkeywithoutid")]).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("entry 1") && text.contains("id missing"),
            "{text}"
        );
        assert!(!text.contains("at least 16"), "wrong diagnosis: {text}");
    }

    /// `verbose` parses as a *target* for the filter library, which then
    /// silences every other line: a typo must be an error instead.
    #[test]
    fn a_log_level_that_is_not_a_level_or_directive_is_an_error_naming_the_variable() {
        for bad in ["verbose", "info,verbose", "vm_webapp=loud", "=debug", ","] {
            let err = parse(&[("LOG_LEVEL", bad)]).expect_err(bad);
            assert!(err.mentions("LOG_LEVEL"), "{bad}: {err}");
        }
        for (good, filter) in [
            ("INFO", "INFO"),
            ("warn", "warn"),
            ("debug,sqlx=warn", "debug,sqlx=warn"),
            ("vm_webapp=debug", "info,vm_webapp=debug"),
            (" off ", "off"),
        ] {
            let s = parse(&[("LOG_LEVEL", good)]).expect(good);
            assert_eq!(s.log_level, filter, "{good}");
            tracing_subscriber::EnvFilter::try_new(&s.log_level).expect("the filter parses");
        }
    }

    #[test]
    fn database_and_redis_urls_that_cannot_be_used_are_refused_at_start() {
        for (variable, value) in [
            ("VM_DB_URL", "postgres://u:p@db:notaport/app"),
            ("VM_DB_URL", "postgres:///app"),
            ("VM_REDIS_URL", "redis://:p@r:notaport"),
            ("VM_REDIS_URL", "redis://"),
            ("VM_REDIS_URL", "r:6379"),
        ] {
            let err = parse(&[(variable, value)]).expect_err(value);
            assert!(err.mentions(variable), "{value}: {err}");
        }
        for (variable, value) in [
            ("VM_DB_URL", "postgres:///app?host=/var/run/postgresql"),
            (
                "VM_DB_URL",
                "postgresql://u:p%40ss@db:5432/app?sslmode=require",
            ),
            ("VM_REDIS_URL", "rediss://:p@r:6380/0"),
            ("VM_REDIS_URL", "unix:///run/redis.sock"),
        ] {
            parse(&[(variable, value)]).expect(value);
        }
    }

    #[test]
    fn known_variables_are_exactly_the_ones_the_settings_read() {
        let read = std::cell::RefCell::new(std::collections::BTreeSet::new());
        let _ = Settings::from_lookup(|name| {
            read.borrow_mut().insert(name.to_string());
            None
        });
        let known: std::collections::BTreeSet<String> =
            KNOWN_VARIABLES.iter().map(|v| v.to_string()).collect();
        assert_eq!(read.into_inner(), known);
    }

    /// `VM_API_KEY=…` (one letter short) used to leave the API open without a
    /// word about the variable: a near-miss name is reported with the setting
    /// it probably means.
    #[test]
    fn a_mistyped_variable_name_is_reported_with_the_setting_it_means() {
        let found = misspelled_variables([
            "VM_API_KEY",
            "LOG_LEVLE",
            "vm_db_url",
            "VM_API_KEYS",
            "HOME",
            "VM_WEBAPP_SERVICE_HOST",
            "KUBERNETES_PORT",
        ]);
        assert_eq!(
            found,
            [
                ("LOG_LEVLE".to_string(), "LOG_LEVEL"),
                ("VM_API_KEY".to_string(), "VM_API_KEYS"),
                ("vm_db_url".to_string(), "VM_DB_URL"),
            ]
        );
    }

    #[test]
    fn outside_local_mode_a_database_url_is_required() {
        let err = parse(&[("APP_ENV", "staging")]).unwrap_err();
        assert!(err.mentions("VM_DB_URL"));
    }
}
