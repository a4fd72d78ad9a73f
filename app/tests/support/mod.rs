//! Test support shared by the integration suites and the benchmark: a real
//! PostgreSQL server on loopback, per-test databases and settings, a fake
//! chat-completions server, and small HTTP helpers.
#![allow(dead_code, missing_docs, clippy::zombie_processes)]

pub mod fake_llm;
pub mod pg;
pub mod redis;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use uuid::Uuid;
use vm_webapp::config::Settings;
use vm_webapp::http::{AppState, router};
use vm_webapp::model::RunStatus;
use vm_webapp::steps::StepRunner;
use vm_webapp::steps::llm::LlmBackend;
use vm_webapp::store::Store;
use vm_webapp::worker::{DrainReport, Worker, WorkerConfig};

/// Which database a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A migrated database with settings pointing at it.
pub struct TestEnv {
    pub settings: Arc<Settings>,
    pub store: Store,
    pub dir: tempfile::TempDir,
}

/// Settings from a map, on top of quick-test defaults.
pub fn settings_from(vars: &[(&str, &str)]) -> Result<Settings, vm_webapp::config::ConfigErrors> {
    let mut env: HashMap<String, String> = [
        ("APP_ENV", "local"),
        ("LOG_LEVEL", "warn"),
        ("VM_JOB_LEASE_MS", "5000"),
        ("VM_JOB_BACKOFF_BASE_MS", "20"),
        ("VM_JOB_BACKOFF_MAX_MS", "100"),
        ("VM_JOB_MAX_ATTEMPTS", "3"),
        ("VM_LLM_TIMEOUT_MS", "2000"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    for (k, v) in vars {
        env.insert(k.to_string(), v.to_string());
    }
    Settings::from_lookup(|k| env.get(k).cloned())
}

impl TestEnv {
    /// A pool of its own on the test's database, beside the store's: for
    /// fixtures, checks and deliberate damage in plain SQL (statistics,
    /// locks, schema changes).
    pub async fn raw_pool(&self) -> sqlx::AnyPool {
        sqlx::any::install_default_drivers();
        sqlx::AnyPool::connect(self.settings.database.url.expose())
            .await
            .expect("raw pool")
    }

    /// A fresh database of `backend`, migrated, with `vars` applied to settings.
    pub async fn new(backend: Backend, vars: &[(&str, &str)]) -> TestEnv {
        let url = match backend {
            Backend::Sqlite => None,
            Backend::Postgres => Some(pg::fresh_database().await),
        };
        Self::at(url, vars).await
    }

    /// A store at `url` that is NOT migrated here (the schema owner did it).
    pub async fn at_unmigrated(url: String, vars: &[(&str, &str)]) -> TestEnv {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().display().to_string();
        let mut all: Vec<(&str, &str)> = vec![("VM_DB_URL", &url), ("VM_WORKSPACE_ROOT", &root)];
        all.extend_from_slice(vars);
        let settings = Arc::new(settings_from(&all).expect("test settings are valid"));
        let store = Store::connect(&settings.database, 10)
            .await
            .expect("connect");
        TestEnv {
            settings,
            store,
            dir,
        }
    }

    /// A migrated database at `url` (a fresh SQLite file when `None`).
    pub async fn at(url: Option<String>, vars: &[(&str, &str)]) -> TestEnv {
        let dir = tempfile::tempdir().expect("tempdir");
        let url =
            url.unwrap_or_else(|| format!("sqlite://{}/test.db?mode=rwc", dir.path().display()));
        let root = dir.path().display().to_string();
        let mut all: Vec<(&str, &str)> = vec![("VM_DB_URL", &url), ("VM_WORKSPACE_ROOT", &root)];
        all.extend_from_slice(vars);
        let settings = Arc::new(settings_from(&all).expect("test settings are valid"));
        let store = Store::connect(&settings.database, 10)
            .await
            .expect("connect")
            .with_plans(settings.plans.clone());
        store.migrate().await.expect("migrate");
        TestEnv {
            settings,
            store,
            dir,
        }
    }

    pub fn state(&self) -> AppState {
        AppState::new(self.store.clone(), self.settings.clone())
    }

    pub fn router(&self) -> Router {
        router(self.state())
    }

    /// Starts a worker; cancel the token to stop it and get its drain report.
    pub fn spawn_worker(
        &self,
        concurrency: usize,
        llm: LlmBackend,
    ) -> (JoinHandle<DrainReport>, CancellationToken) {
        self.spawn_worker_with(concurrency, llm, |_| {})
    }

    pub fn spawn_worker_with(
        &self,
        concurrency: usize,
        llm: LlmBackend,
        tune: impl FnOnce(&mut WorkerConfig),
    ) -> (JoinHandle<DrainReport>, CancellationToken) {
        let mut config = WorkerConfig {
            id: format!("test-{}", &Uuid::new_v4().simple().to_string()[..8]),
            concurrency,
            poll_interval: Duration::from_millis(25),
            lease: self.settings.queue.lease,
            backoff_base: self.settings.queue.backoff_base,
            backoff_max: self.settings.queue.backoff_max,
            shutdown_grace: self.settings.queue.shutdown_grace,
        };
        tune(&mut config);
        let worker = Worker::new(
            self.store.clone(),
            StepRunner::new(llm),
            config,
            Arc::new(tokio::sync::Notify::new()),
        );
        let token = CancellationToken::new();
        (tokio::spawn(worker.run(token.clone())), token)
    }

    /// Polls until the run reaches `status`; panics with the run after `timeout`.
    pub async fn wait_for(
        &self,
        id: Uuid,
        status: RunStatus,
        timeout: Duration,
    ) -> vm_webapp::model::RunDetail {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let detail = self
                .store
                .get_run(id)
                .await
                .expect("get_run")
                .expect("run exists");
            if detail.run.status == status {
                return detail;
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "run {id} did not reach {status:?} in {timeout:?}: {:?} {:?}",
                    detail.run.status, detail.steps
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Event types of a run, in order.
    pub async fn event_types(&self, id: Uuid) -> Vec<String> {
        self.store
            .list_events(id, 0, 10_000)
            .await
            .expect("events")
            .into_iter()
            .map(|e| e.event_type)
            .collect()
    }
}

/// Sends a request and returns only the status (for non-JSON answers).
pub async fn send_raw(app: &Router, method: &str, uri: &str, body: Option<&str>) -> StatusCode {
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .body(
            body.map(|b| Body::from(b.to_string()))
                .unwrap_or_else(Body::empty),
        )
        .expect("request");
    app.clone()
        .oneshot(req)
        .await
        .expect("router answers")
        .status()
}

/// GETs `uri` and returns the body as text (for non-JSON answers such as metrics).
pub async fn get_text(app: &Router, uri: &str) -> String {
    let req = Request::builder()
        .uri(uri)
        .body(Body::empty())
        .expect("request");
    let res = app.clone().oneshot(req).await.expect("router answers");
    assert_eq!(res.status(), StatusCode::OK, "GET {uri}");
    let bytes = res.into_body().collect().await.expect("body").to_bytes();
    String::from_utf8(bytes.to_vec()).expect("utf-8")
}

/// GETs `uri` with an `Authorization` header and returns the body as text
/// (for non-JSON answers such as the usage CSV).
pub async fn get_text_as(app: &Router, uri: &str, authorization: &str) -> String {
    let req = Request::builder()
        .uri(uri)
        .header("authorization", authorization)
        .body(Body::empty())
        .expect("request");
    let res = app.clone().oneshot(req).await.expect("router answers");
    let status = res.status();
    let bytes = res.into_body().collect().await.expect("body").to_bytes();
    let text = String::from_utf8(bytes.to_vec()).expect("utf-8");
    assert_eq!(status, StatusCode::OK, "GET {uri}: {text}");
    text
}

/// A response, decoded.
pub struct Reply {
    pub status: StatusCode,
    pub headers: axum::http::HeaderMap,
    pub body: Value,
}

/// Sends one request through the router.
pub async fn send(
    app: &Router,
    method: &str,
    uri: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> Reply {
    let mut req = Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(
            body.map(|b| Body::from(b.to_string()))
                .unwrap_or_else(Body::empty),
        )
        .expect("request");
    let res = app.clone().oneshot(req).await.expect("router answers");
    let status = res.status();
    let headers = res.headers().clone();
    let bytes = res.into_body().collect().await.expect("body").to_bytes();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| panic!("response is not JSON: {}", String::from_utf8_lossy(&bytes)))
    };
    Reply {
        status,
        headers,
        body,
    }
}

/// Creates a run through the API and returns its id.
pub async fn create(app: &Router, body: &str) -> Uuid {
    let reply = send(app, "POST", "/api/v2/runs", Some(body), &[]).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.body);
    reply.body["id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("run id")
}

/// Generates one test per backend for each named scenario `async fn name(Backend)`.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::support::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::support::Backend::Postgres).await
                }
            )*
        }
    };
}
