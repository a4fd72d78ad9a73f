//! Probes.
//!
//! - `GET /api/v2/health/live`: `200 {"status":"live"}` while the process can
//!   answer at all; touches no dependency, so a database outage never gets the
//!   pod restarted.
//! - `GET /api/v2/health/ready`: `200 {"status":"ready",…}` or
//!   `503 {"status":"not_ready",…}` with `dependencies.database`, `.worker` and
//!   `.redis`, each `{"status": "ok"|"error"|"disabled", "reason": …}`. The
//!   worker is checked in-process when it runs here, else through the
//!   freshest heartbeat in the database; the database is a round trip, and
//!   after a write refused for a full disk or an I/O error also no such
//!   refusal for a few seconds and a write that commits
//!   (`Store::takes_writes`); only the database, an in-process
//!   worker and shutdown decide readiness. The checks run concurrently, each
//!   bounded by [`READY_CHECK_BUDGET`], so the answer (a 503 with its reason
//!   included) arrives well inside the readiness probe's `timeoutSeconds` that
//!   the operator renders; the answer flips to `not_ready` as soon as shutdown
//!   begins. Reasons are fixed phrases, never driver messages.

use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;

use crate::http::AppState;
use crate::http::views::{Dependencies, DependencyView, LiveView, ReadyView};
use crate::model::now_ms;

/// Budget of each readiness check (database, worker heartbeat, Redis). The
/// checks run concurrently, so this bounds the whole answer. It must stay
/// clearly inside the readiness probe's `timeoutSeconds` (2 s, rendered by the
/// operator): a check that used the whole probe timeout would make the kubelet
/// record a timeout instead of the 503 and its reason. The operator's contract
/// test holds the budget to at most half the rendered timeout.
pub const READY_CHECK_BUDGET: Duration = Duration::from_secs(1);

/// Liveness: no dependency I/O at all.
#[utoipa::path(get, path = "/api/v2/health/live", tag = "health", responses((status = 200, body = LiveView)))]
pub async fn live() -> Json<LiveView> {
    Json(LiveView { status: "live" })
}

fn dep(status: &'static str, reason: &'static str) -> DependencyView {
    DependencyView { status, reason }
}

async fn database(state: &AppState) -> DependencyView {
    // A full disk leaves the database readable: once a write was refused
    // for it, the store also says whether writes succeed again.
    let check = async {
        if state.store.ping().await.is_err() {
            return dep("error", "database unreachable");
        }
        if state.store.takes_writes().await {
            dep("ok", "reachable")
        } else {
            dep("error", "database refuses writes (disk full or I/O error)")
        }
    };
    match tokio::time::timeout(READY_CHECK_BUDGET, check).await {
        Ok(view) => view,
        Err(_) => dep("error", "database check timed out"),
    }
}

async fn worker(state: &AppState) -> DependencyView {
    let stall_ms = state.worker_stall_after.as_millis() as i64;
    match &state.worker {
        None => {
            match tokio::time::timeout(READY_CHECK_BUDGET, state.store.heartbeat_age_ms()).await {
                Ok(Ok(Some(age))) if age <= stall_ms => {
                    dep("ok", "a worker reported a recent heartbeat")
                }
                Ok(Ok(Some(_))) => dep(
                    "error",
                    "no worker heartbeat within the window; runs stay queued",
                ),
                Ok(Ok(None)) => dep(
                    "error",
                    "no worker has reported a heartbeat; runs stay queued",
                ),
                _ => dep("error", "worker heartbeat check failed"),
            }
        }
        Some(w) => {
            let last = w.last_pass_ms.load(Ordering::Relaxed);
            if last == 0 {
                dep("error", "worker has not started")
            } else if now_ms() - last > stall_ms {
                dep("error", "worker loop stalled")
            } else {
                dep("ok", "polling")
            }
        }
    }
}

async fn redis(state: &AppState) -> DependencyView {
    match &state.redis {
        None => dep("disabled", "not configured"),
        Some(bus) => match tokio::time::timeout(READY_CHECK_BUDGET, bus.ping()).await {
            Ok(true) => dep("ok", "reachable"),
            Ok(false) => dep("error", "redis unreachable; workers fall back to polling"),
            Err(_) => dep(
                "error",
                "redis check timed out; workers fall back to polling",
            ),
        },
    }
}

/// Readiness: the database, the worker and Redis, each bounded in time.
#[utoipa::path(
    get,
    path = "/api/v2/health/ready",
    tag = "health",
    responses(
        (status = 200, description = "Ready", body = ReadyView),
        (status = 503, description = "Not ready (database down, own worker stalled, or shutting down)", body = ReadyView),
    )
)]
pub async fn ready(State(state): State<AppState>) -> (StatusCode, Json<ReadyView>) {
    let (database, worker, redis) = tokio::join!(database(&state), worker(&state), redis(&state));
    let shutting_down = state.is_shutting_down();
    // A stalled in-process worker makes this process unfit to serve; a
    // missing separate worker does not: runs are durable and are accepted
    // (the `worker` entry and the queue metrics tell on-call people). Redis
    // only speeds up wake-ups, so it never decides readiness.
    let own_worker_failed = state.worker.is_some() && worker.status == "error";
    let healthy = !shutting_down && database.status == "ok" && !own_worker_failed;
    let body = ReadyView {
        status: if healthy { "ready" } else { "not_ready" },
        dependencies: Dependencies {
            database,
            worker,
            redis,
        },
        reason: shutting_down.then_some("shutting down"),
    };
    let code = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body))
}
