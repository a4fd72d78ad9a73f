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
    /// `VM_SHUTDOWN_DELAY_MS`: after SIGTERM, how long to keep answering
    /// (`not_ready`) before closing the listener, so that endpoints are
    /// updated before connections are refused.
    pub shutdown_delay: Duration,
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
            if !(url.starts_with("redis://")
                || url.starts_with("rediss://")
                || url.starts_with("unix://"))
            {
                p.fail(
                    "VM_REDIS_URL",
                    "expected a redis://, rediss:// or unix:// URL",
                );
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

        let log_level = p.get("LOG_LEVEL").unwrap_or_else(|| "info".to_string());
        if tracing_subscriber::EnvFilter::try_new(&log_level).is_err() {
            p.fail(
                "LOG_LEVEL",
                "expected a level (error, warn, info, debug, trace) or a tracing filter directive",
            );
        }
        let log_format = match p.get("LOG_FORMAT").map(|v| v.to_ascii_lowercase()).as_deref() {
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
        })
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
        ]
        .join("\n")
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
    let backend = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        DbBackend::Postgres
    } else if url.starts_with("sqlite:") {
        DbBackend::Sqlite
    } else {
        p.fail("VM_DB_URL", "expected a postgres:// or sqlite:// URL");
        return embedded();
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
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn parse(vars: &[(&str, &str)]) -> Result<Settings, ConfigErrors> {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
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
        assert!(err.mentions("VM_DB_URL") && err.mentions("VM_REDIS_URL"), "{err}");
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
        for var in ["APP_ENV", "PORT", "LOG_FORMAT", "KIMI_BASE_URL", "VM_JOB_MAX_ATTEMPTS", "VM_ENABLE_MANAGED_MODE"] {
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
        assert!(!text.contains("hunter2") && !text.contains("redispw"), "{text}");
        let ok = parse(&[("VM_DB_URL", "postgres://admin:hunter2@db/app"), ("KIMI_API_KEY", "sk-live-123")]).expect("valid");
        let debug = format!("{ok:?} {}", ok.summary());
        assert!(!debug.contains("hunter2") && !debug.contains("sk-live-123"), "{debug}");
    }

    #[test]
    fn outside_local_mode_a_database_url_is_required() {
        let err = parse(&[("APP_ENV", "staging")]).unwrap_err();
        assert!(err.mentions("VM_DB_URL"));
    }
}
